"""How a connection's options become a stored blob, and back.

With a key, the options (a JSON object) are sealed as one envelope; without one they are
stored as plain JSON and the agent says so when it starts.
"""

from __future__ import annotations

import json
from typing import Any

from outpost.crypto import Key, open_sealed, seal
from outpost.errors import KeyError_, OutpostError
from outpost.state.commands import StoredConnection


def encode_options(options: dict[str, Any], key: Key | None) -> tuple[bytes, bool]:
    """Return (blob, encrypted)."""
    plain = json.dumps(options, sort_keys=True, separators=(",", ":")).encode()
    if key is None:
        return plain, False
    return seal(key, plain), True


def decode_options(connection: StoredConnection, key: Key | None) -> dict[str, Any]:
    """The options of a stored connection, decrypted and checked."""
    blob = connection.options_blob
    what = f"stored options of connection {connection.slug!r}"
    if connection.encrypted:
        if key is None:
            raise KeyError_(
                f"The {what} are encrypted but no key_path is set; set key_path to the key file."
            )
        blob = open_sealed(key, blob, what=what)
    try:
        data = json.loads(blob)
    except ValueError:
        raise OutpostError(f"The {what} are corrupt (not JSON); restore from a backup.") from None
    if not isinstance(data, dict):
        raise OutpostError(f"The {what} are corrupt (not an object); restore from a backup.")
    return data
