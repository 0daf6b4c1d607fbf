"""Config discovery, validation (every error at once), env overrides, secrets, redaction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from outpost.config import REDACTED, discover_config_path, load_config
from outpost.errors import ConfigError


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_defaults_when_no_file(clean_env: Path) -> None:
    loaded = load_config()
    cfg = loaded.config
    assert loaded.source is None or loaded.source == Path("/etc/outpost/agent.json")
    assert cfg.api.client_bind_addresses == ["127.0.0.1:9701"]
    assert cfg.read_only is False
    assert cfg.key_path is None
    assert cfg.log.format == "text"
    assert cfg.cluster.election_timeout == 1000
    assert cfg.cluster.heartbeat_interval == 100
    assert cfg.pooler is None


def test_discovery_order_for_users(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    xdg = Path(os.environ["XDG_CONFIG_HOME"]) / "outpost" / "agent.json"
    home = clean_env / ".config" / "outpost" / "agent.json"
    write(home, {"read_only": True})
    assert discover_config_path()[0] == home
    write(xdg, {"read_only": False})
    assert discover_config_path()[0] == xdg


def test_root_reads_only_etc(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    write(Path(os.environ["XDG_CONFIG_HOME"]) / "outpost" / "agent.json", {})
    path, _ = discover_config_path()
    assert path in (None, Path("/etc/outpost/agent.json"))


def test_explicit_path_and_env(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write(tmp_path / "a.json", {"read_only": True})
    b = write(tmp_path / "b.json", {"read_only": False})
    monkeypatch.setenv("OUTPOST_CONFIG", str(a))
    assert load_config().source == a
    assert load_config(str(b)).source == b  # -c wins over OUTPOST_CONFIG


def test_missing_explicit_file_is_one_sentence(clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "nope.json"))
    assert str(err.value) == (
        f"Config file {tmp_path / 'nope.json'} (given with -c/--config) does not exist; "
        "create it or fix the path."
    )


def test_every_error_at_once(clean_env: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.json",
        {
            "data_dir": "/tmp/x",
            "bogus": 1,
            "log": {"level": "loud"},
            "api": {"client_bind_addresses": ["127.0.0.1:70000", "nohost"]},
            "cluster": {"election_timeout": "soon", "extra": True},
            "hq": {"url": "ftp://hq"},
        },
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    problems = err.value.problems
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert all(p.startswith(f"{path}: key '") for p in problems)
    assert "key 'bogus': unknown key" in text
    assert "key 'cluster.extra': unknown key" in text
    assert "key 'log.level'" in text
    assert "port 70000" in text
    assert "'nohost' is not HOST:PORT" in text
    assert "key 'cluster.election_timeout'" in text
    assert "key 'hq.url'" in text


def test_invalid_json_names_line_and_column(clean_env: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text('{\n  "data_dir": "/x",\n  "read_only": tru\n}')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: line 3, column")
    assert "invalid JSON" in str(err.value)


def test_env_overrides(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "agent.json", {"read_only": False, "log": {"level": "info"}})
    monkeypatch.setenv("OUTPOST_READ_ONLY", "true")
    monkeypatch.setenv("OUTPOST_LOG_LEVEL", "debug")
    monkeypatch.setenv("OUTPOST_API_CLIENT_BIND_ADDRESSES", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("OUTPOST_HQ_TOKEN", "tok-123")
    monkeypatch.setenv("OUTPOST_CLUSTER_ELECTION_TIMEOUT", "2000")
    loaded = load_config(str(path))
    cfg = loaded.config
    assert cfg.read_only is True
    assert cfg.log.level == "debug"
    assert cfg.api.client_bind_addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    assert cfg.hq.token is not None and cfg.hq.token.get_secret_value() == "tok-123"
    assert cfg.cluster.election_timeout == 2000


def test_env_error_names_the_variable(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert str(err.value).startswith("OUTPOST_LOG_FORMAT: key 'log.format'")


def test_secret_refs_and_redaction(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "dsn"
    secret_file.write_text("postgresql://u:hunter2@db/auth\n")
    monkeypatch.setenv("MY_HQ_TOKEN", "very-secret-token")
    path = write(
        tmp_path / "agent.json",
        {
            "hq": {"url": "https://hq.example", "token": {"$env": "MY_HQ_TOKEN"}},
            "pooler": {"auth_db_dsn": {"$file": str(secret_file)}},
            "storage": {
                "backend": "s3",
                "backends": {"s3": {"bucket": "b", "secret_access_key": "AKIAXX"}},
            },
        },
    )
    loaded = load_config(str(path))
    assert loaded.config.hq.token is not None
    assert loaded.config.hq.token.get_secret_value() == "very-secret-token"
    assert loaded.config.pooler is not None and loaded.config.pooler.auth_db_dsn is not None
    assert loaded.config.pooler.auth_db_dsn.get_secret_value() == "postgresql://u:hunter2@db/auth"
    shown = json.dumps(loaded.redacted())
    for secret in ("very-secret-token", "hunter2", "AKIAXX"):
        assert secret not in shown
    red = loaded.redacted()
    assert red["hq"]["token"] == REDACTED
    assert red["hq"]["url"] == "https://hq.example"
    assert red["storage"]["backends"]["s3"]["bucket"] == "b"


def test_missing_env_secret_is_reported(clean_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", {"hq": {"token": {"$env": "NOT_SET_ANYWHERE_42"}}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "environment variable NOT_SET_ANYWHERE_42 is not set" in str(err.value)


def test_relative_paths_resolve_against_the_config_file(clean_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "conf" / "agent.json", {"data_dir": "data", "key_path": "agent.key"})
    cfg = load_config(str(path)).config
    assert cfg.data_dir == tmp_path / "conf" / "data"
    assert cfg.key_path == tmp_path / "conf" / "agent.key"


def test_pooler_accepts_perseus_aliases(clean_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", {"pooler": {"max_open_conns": 7, "pool_mode": "session"}})
    cfg = load_config(str(path)).config
    assert cfg.pooler is not None
    assert cfg.pooler.pool_size == 7
    assert cfg.pooler.pool_mode == "session"


def test_pooler_name_and_alias_together_is_one_clear_error(clean_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", {"pooler": {"pool_size": 3, "max_open_conns": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert "pooler" in message
    assert "give either pool_size or its Perseus name max_open_conns, not both" in message
    assert "unknown key" not in message


def test_storage_backend_must_be_configured(clean_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", {"storage": {"backend": "s3"}})
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "backend 's3' has no entry under storage.backends" in str(err.value)
