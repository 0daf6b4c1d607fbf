"""The backup file: connection data (not cluster metadata) with its own checks.

Layout::

    OUTPOST-BACKUP 1\\n
    {"format": 1, "created_at": ..., "outpost_version": ..., "encrypted": true,
     "key_id": "...", "connections": N, "payload_bytes": L, "sha256": "..."}\\n
    <L bytes of payload>

The payload is the JSON list of stored connections (options as stored: sealed envelopes when
the store is encrypted). When a key is set the whole payload is sealed again with it, so names
are not readable either. A truncated file fails the length check, an altered one the SHA-256
(and, when encrypted, the HMAC) check, before anything is restored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from outpost import __version__
from outpost.crypto import Key, envelope_key_id, open_sealed, seal
from outpost.errors import BackupError, KeyError_
from outpost.state.commands import StoredConnection, StoredRoute

MAGIC = b"OUTPOST-BACKUP 1\n"
_connections_adapter = TypeAdapter(list[StoredConnection])
_routes_adapter = TypeAdapter(list[StoredRoute])


@dataclass
class BackupPayload:
    connections: list[StoredConnection]
    key_id: str | None
    created_at: float
    routes: list[StoredRoute] = field(default_factory=list)


def dump(
    connections: list[StoredConnection],
    key: Key | None,
    key_id: str | None,
    routes: Sequence[StoredRoute] = (),
) -> bytes:
    """The bytes of a backup of CONNECTIONS (and pooler ROUTES), sealed with KEY when given.

    Without routes the payload is the JSON list of connections (what every version reads);
    with routes it is ``{"connections": [...], "routes": [...]}``.
    """
    payload = _connections_adapter.dump_json(connections)
    if routes:
        payload = (
            b'{"connections":'
            + payload
            + b',"routes":'
            + _routes_adapter.dump_json(list(routes))
            + b"}"
        )
    if key is not None:
        payload = seal(key, payload)
    header = {
        "format": 1,
        "created_at": time.time(),
        "outpost_version": __version__,
        "encrypted": key is not None,
        "key_id": key.id if key is not None else key_id,
        "connections": len(connections),
        "routes": len(routes),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def load(data: bytes, key: Key | None, *, source: str) -> BackupPayload:
    """Parse and check a backup completely; raise BackupError before anything is used."""
    if not data.startswith(MAGIC):
        raise BackupError(f"{source} is not an Outpost backup (it lacks the backup header).")
    rest = data[len(MAGIC) :]
    line, sep, payload = rest.partition(b"\n")
    if not sep:
        raise BackupError(f"Backup {source} is truncated (its header is incomplete).")
    try:
        header = json.loads(line)
        expected_len = int(header["payload_bytes"])
        expected_sha = str(header["sha256"])
        encrypted = bool(header["encrypted"])
        created_at = float(header["created_at"])
        count = int(header["connections"])
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"Backup {source} has a corrupt header; it cannot be used.") from None
    if len(payload) < expected_len:
        raise BackupError(
            f"Backup {source} is truncated ({len(payload)} of {expected_len} payload bytes); "
            "nothing was restored."
        )
    if len(payload) > expected_len:
        raise BackupError(
            f"Backup {source} has {len(payload) - expected_len} unexpected trailing bytes; "
            "nothing was restored."
        )
    if hashlib.sha256(payload).hexdigest() != expected_sha:
        raise BackupError(
            f"Backup {source} fails its checksum (it was altered or corrupted); "
            "nothing was restored."
        )
    if encrypted:
        if key is None:
            raise KeyError_(
                f"Backup {source} is encrypted; set key_path to the key it was made with."
            )
        if envelope_key_id(payload) != key.id:
            raise KeyError_(
                f"Backup {source} was encrypted with another key than {key.path}; set key_path "
                "to the key it was made with."
            )
        payload = open_sealed(key, payload, what=f"backup {source}")
    try:
        document = json.loads(payload)
        if isinstance(document, dict):
            connections = _connections_adapter.validate_python(document.get("connections"))
            routes = _routes_adapter.validate_python(document.get("routes") or [])
        else:
            connections = _connections_adapter.validate_python(document)
            routes = []
    except (ValidationError, ValueError):
        raise BackupError(f"Backup {source} has corrupt contents; nothing was restored.") from None
    if len(routes) != int(header.get("routes") or 0):
        raise BackupError(f"Backup {source} is inconsistent (route count); not restored.")
    if len(connections) != count:
        raise BackupError(f"Backup {source} is inconsistent (connection count); not restored.")
    encrypted_any = any(c.encrypted for c in connections) or any(r.encrypted for r in routes)
    key_id = header.get("key_id") if encrypted_any else None
    return BackupPayload(
        connections=connections, key_id=key_id, created_at=created_at, routes=routes
    )
