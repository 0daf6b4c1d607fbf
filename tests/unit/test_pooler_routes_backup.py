"""Pooler routes survive backup/restore and key rotation (AgentService, real store files)."""

from __future__ import annotations

import json
from pathlib import Path

from outpost.api.service import AgentService
from outpost.config import load_config
from outpost.crypto import generate_key_file
from outpost.pooler.route_admin import LocalRouteAdmin
from outpost.state import backup


def service(root: Path, key: Path | None) -> AgentService:
    root.mkdir(parents=True, exist_ok=True)
    config = {"data_dir": str(root / "data")}
    if key is not None:
        config["key_path"] = str(key)
    (root / "agent.json").write_text(json.dumps(config))
    return AgentService.open(load_config(str(root / "agent.json"), env={}))


def test_backup_restore_and_rotation_keep_routes(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k1")
    svc = service(tmp_path / "a", tmp_path / "k1")
    svc.add_connection(
        "postgres", "dest", {"host": "db", "user": "app", "password": "x"}, verify=False
    )
    LocalRouteAdmin(svc.store, svc.key).add_route("app", "t1", "alice", "pw-1", "dest")
    data = svc.backup_bytes()
    header = json.loads(data.split(b"\n")[1])
    assert header["routes"] == 1 and header["connections"] == 1
    assert backup.load(data, key, source="b").routes == svc.store.routes()
    svc.close()

    fresh = service(tmp_path / "b", tmp_path / "k1")
    assert fresh.restore(data, "b") == 1
    infos = LocalRouteAdmin(fresh.store, fresh.key).list_routes()
    assert [(i.database, i.schema_name, i.user, i.to) for i in infos] == [
        ("app", "t1", "alice", "dest")
    ]
    assert infos[0].auth == ["scram-sha-256", "md5", "password"]

    new_key = generate_key_file(tmp_path / "k2")
    fresh.rotate_key(fresh.key, new_key)
    assert LocalRouteAdmin(fresh.store, new_key).list_routes()[0].auth  # re-sealed
    fresh.close()


def test_backup_without_routes_keeps_format_one(tmp_path: Path) -> None:
    svc = service(tmp_path / "a", None)
    svc.add_connection("postgres", "dest", {"host": "db"}, verify=False)
    data = svc.backup_bytes()
    payload = data.split(b"\n", 2)[2]
    assert payload.startswith(b"[")  # what older Outposts read
    assert backup.load(data, None, source="b").routes == []
    svc.close()
