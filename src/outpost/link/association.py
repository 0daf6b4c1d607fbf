"""The agent's association with one Outpost HQ, kept in the data dir.

``hq.json`` (mode 0600) holds what is public: HQ's URL and id, the agent's name there, HQ's
pinned Ed25519 signing key, the CA file and whether plain HTTP was allowed. ``hq.token`` (mode
0600) holds the agent token, sealed with the agent key (``key_path``) when one is configured.
Both are written atomically, so ``outpost login`` may write them while ``outpost serve`` runs;
the running agent reads them again at each (re)connect and on SIGHUP.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from outpost.crypto import Key, is_sealed, open_sealed, seal
from outpost.link.errors import LinkError

ASSOCIATION_FILE = "hq.json"
TOKEN_FILE = "hq.token"  # noqa: S105 - a file name


class Association(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str
    agent_name: str
    hq_id: str
    signing_key: str  # HQ's Ed25519 public key, base64 (pinned at the first login)
    ca_file: str | None = None
    allow_insecure: bool = False
    associated_at: float = 0.0


def write_private(path: Path, data: bytes) -> None:
    """Write DATA to PATH atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_association(data_dir: Path) -> Association | None:
    path = data_dir / ASSOCIATION_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LinkError(f"Cannot read {path}: {exc.strerror}; fix its permissions.") from None
    try:
        return Association.model_validate_json(text)
    except ValidationError:
        raise LinkError(
            f"{path} is damaged; remove {path} and {data_dir / TOKEN_FILE} and run "
            "`outpost login` again."
        ) from None


def save_association(data_dir: Path, association: Association) -> None:
    if not association.associated_at:
        association = association.model_copy(update={"associated_at": time.time()})
    write_private(
        data_dir / ASSOCIATION_FILE,
        (json.dumps(association.model_dump(mode="json"), indent=2) + "\n").encode(),
    )


def load_token(data_dir: Path, key: Key | None) -> str | None:
    """The stored agent token, opened with KEY when it is sealed; None when there is none."""
    path = data_dir / TOKEN_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LinkError(f"Cannot read {path}: {exc.strerror}; fix its permissions.") from None
    if is_sealed(data):
        if key is None:
            raise LinkError(
                f"{path} is sealed with an agent key but no key_path is set; set key_path to "
                "the key used at `outpost login`, or log in again."
            )
        data = open_sealed(key, data, what=f"HQ token in {path}")
    token = data.decode().strip()
    return token or None


def save_token(data_dir: Path, key: Key | None, token: str) -> None:
    """Store TOKEN, sealed with KEY when there is one (else plain text, mode 0600)."""
    data = token.encode()
    write_private(data_dir / TOKEN_FILE, seal(key, data) if key is not None else data + b"\n")
