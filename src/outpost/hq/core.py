"""What a running HQ holds: settings, the database, the signing key, its id, the dispatcher."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import SQLAlchemyError

from outpost.errors import OutpostError
from outpost.hq.db import Database
from outpost.hq.dispatch import Dispatcher
from outpost.hq.migrations import upgrade
from outpost.hq.settings import HQSettings
from outpost.hq.signing import load_or_create_key

log = logging.getLogger("outpost.hq")
logging.getLogger("alembic").setLevel(logging.WARNING)


def safe_url(db: Database) -> str:
    return db.url.render_as_string(hide_password=True)


def database_error(db: Database, exc: SQLAlchemyError) -> OutpostError:
    """One sentence for a database that cannot be opened (never with its password)."""
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if db.url.password:
        reason = reason.replace(str(db.url.password), "***")
    return OutpostError(f"Cannot use HQ database {safe_url(db)}: {reason}; check --database.")


def open_database(settings: HQSettings) -> Database:
    """Open HQ's database and bring its schema up to date (Alembic)."""
    if settings.database is None:
        ensure_data_dir(settings)
    db = Database(settings.url)
    try:
        upgrade(db.engine)
    except SQLAlchemyError as exc:
        db.dispose()
        raise database_error(db, exc) from None
    return db


def ensure_data_dir(settings: HQSettings) -> None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise OutpostError(
            f"Cannot create HQ's data dir {settings.data_dir}: {exc.strerror}; "
            "choose another with --data-dir."
        ) from None
    if not os.access(settings.data_dir, os.W_OK):
        raise OutpostError(
            f"HQ's data dir {settings.data_dir} is not writable; fix its permissions or "
            "choose another with --data-dir."
        )


@dataclass
class HQCore:
    settings: HQSettings
    db: Database
    key: Ed25519PrivateKey
    hq_id: str
    dispatcher: Dispatcher
    admin_hashes: set[str] = field(default_factory=set)
    ready: bool = False

    @classmethod
    def open(cls, settings: HQSettings) -> HQCore:
        """Data dir, signing key, database (migrated); raises OutpostError with one sentence."""
        ensure_data_dir(settings)
        key = load_or_create_key(settings.signing_key_path)
        db = open_database(settings)
        try:
            hq_id = db.store.hq_id()
        except SQLAlchemyError as exc:
            db.dispose()
            raise database_error(db, exc) from None
        return cls(
            settings=settings, db=db, key=key, hq_id=hq_id, dispatcher=Dispatcher(db, settings)
        )

    def close(self) -> None:
        self.db.dispose()
