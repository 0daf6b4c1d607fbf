"""The state store: apply(), the data dir lock, crash safety, backup format."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from outpost.crypto import Key
from outpost.errors import BackupError, ConflictError, DataDirLockedError, KeyError_, NotFoundError
from outpost.state import backup
from outpost.state.codec import decode_options, encode_options
from outpost.state.commands import (
    AddConnection,
    DeleteConnection,
    MarkStarted,
    RenameConnection,
    RestoreConnections,
    b64,
    decode_command,
    encode_command,
)
from outpost.state.store import AgentRunningError, Store

KEY = Key(bytes(range(64)), "/k")


def add(
    store: Store,
    slug: str,
    name: str,
    options: dict[str, object] | None = None,
    key: Key | None = None,
) -> None:
    blob, enc = encode_options(options or {"host": "h"}, key)
    store.apply(
        AddConnection(
            slug=slug,
            name=name,
            driver="postgres",
            options_b64=b64(blob),
            encrypted=enc,
            key_id=key.id if key else None,
            at=1.0,
        )
    )


def test_apply_add_rename_delete(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store:
        add(store, "a", "Alpha", {"host": "x", "password": "p"})
        add(store, "b", "Bravo")
        store.apply(RenameConnection(slug="a", name="Zulu", at=2.0))
        assert [c.name for c in store.connections()] == ["Bravo", "Zulu"]
        assert decode_options(store.connection("a"), None) == {"host": "x", "password": "p"}
        store.apply(DeleteConnection(slug="b"))
        assert store.slugs() == {"a"}
        assert store.applied_index == 4


def test_apply_rejects_without_changing(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store:
        add(store, "a", "Alpha")
        with pytest.raises(ConflictError, match="named 'alpha' already exists"):
            add(store, "a2", "alpha")
        with pytest.raises(NotFoundError, match="No connection with slug 'nope'"):
            store.apply(DeleteConnection(slug="nope"))
        assert store.slugs() == {"a"}
        assert store.applied_index == 1


def test_commands_roundtrip_as_bytes() -> None:
    cmd = RenameConnection(slug="a", name="B", at=3.5)
    assert decode_command(encode_command(cmd)) == cmd


def test_store_files_are_private(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store:
        assert (store.data_dir.stat().st_mode & 0o777) == 0o700
        assert (store.path.stat().st_mode & 0o777) == 0o600


def test_second_agent_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "d", owner="serve"):
        with pytest.raises(AgentRunningError, match="already running on data dir"):
            Store(tmp_path / "d", owner="serve")
        with pytest.raises(AgentRunningError):
            Store(tmp_path / "d", owner="cli")


def test_cli_lock_waits_then_names_holder(tmp_path: Path) -> None:
    with (
        Store(tmp_path / "d", owner="cli"),
        pytest.raises(DataDirLockedError, match=f"in use by pid {os.getpid()}"),
    ):
        Store(tmp_path / "d", owner="cli", wait_for_cli=0.2)


def test_restore_only_into_new_store(tmp_path: Path) -> None:
    with Store(tmp_path / "src") as src:
        add(src, "a", "Alpha", {"password": "s3cr3t"}, KEY)
        data = backup.dump(src.connections(), KEY, src.key_id)
    payload = backup.load(data, KEY, source="b")
    with Store(tmp_path / "new") as new:
        new.apply(
            RestoreConnections(connections=payload.connections, key_id=payload.key_id, at=5.0)
        )
        assert decode_options(new.connection("a"), KEY) == {"password": "s3cr3t"}
        assert new.key_id == KEY.id
    with Store(tmp_path / "used") as used:
        used.apply(MarkStarted(at=1.0))
        with pytest.raises(ConflictError, match="already been started"):
            used.apply(RestoreConnections(connections=payload.connections, key_id=None, at=5.0))
        assert used.connections() == []


def test_backup_checks(tmp_path: Path) -> None:
    with Store(tmp_path / "src") as src:
        add(src, "a", "Alpha", {"password": "s3cr3t"}, KEY)
        data = backup.dump(src.connections(), KEY, src.key_id)
    assert b"s3cr3t" not in data and b"Alpha" not in data
    with pytest.raises(BackupError, match="truncated"):
        backup.load(data[:-10], KEY, source="f")
    altered = bytearray(data)
    altered[-40] ^= 1
    with pytest.raises(BackupError, match="fails its checksum"):
        backup.load(bytes(altered), KEY, source="f")
    with pytest.raises(BackupError, match="not an Outpost backup"):
        backup.load(b"hello", KEY, source="f")
    with pytest.raises(KeyError_, match="encrypted with another key"):
        backup.load(data, Key(bytes(64), "/other"), source="f")
    with pytest.raises(KeyError_, match="is encrypted; set key_path"):
        backup.load(data, None, source="f")


def test_unencrypted_backup_roundtrip(tmp_path: Path) -> None:
    with Store(tmp_path / "src") as src:
        add(src, "a", "Alpha", {"host": "h1"})
        data = backup.dump(src.connections(), None, None)
    header = json.loads(data.split(b"\n")[1])
    assert header["encrypted"] is False and header["connections"] == 1
    assert backup.load(data, None, source="f").connections[0].name == "Alpha"


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from outpost.state.store import Store
    from outpost.state.commands import AddConnection, b64
    store = Store(Path(sys.argv[1]))
    i = len(store.connections())
    print("ready", flush=True)
    while True:
        store.apply(AddConnection(slug=f"c{i}", name=f"conn {i}", driver="sqlite",
                                  options_b64=b64(b"x" * 4096), encrypted=False, at=time.time()))
        i += 1
    """
)


def _count(db_path: Path) -> int:
    db = sqlite3.connect(db_path, timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM connections").fetchone()[0])
    finally:
        db.close()


def test_killed_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    for round_ in range(1, 4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data_dir)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while _count(data_dir / "agent.db") < 20 * round_ and time.monotonic() < deadline:
            pass
        proc.send_signal(signal.SIGKILL)  # no warning, mid-write
        proc.wait()
        with Store(data_dir) as store:
            rows = store.connections()
            assert len(rows) >= 20 * round_
            assert store.applied_index == len(rows)
            db = sqlite3.connect(store.path)
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            db.close()
            assert all(len(r.options_blob) == 4096 for r in rows)  # never half a blob
            assert sorted(int(r.slug[1:]) for r in rows) == list(range(len(rows)))
