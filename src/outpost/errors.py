"""Errors a user sees: one sentence naming the thing and what to do."""

from __future__ import annotations


class OutpostError(Exception):
    """Base of every error shown to a user as one sentence (no traceback unless --debug)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(OutpostError):
    """A bad flag or argument; exit code 2 like click's own usage errors."""

    exit_code = 2


class ConfigError(OutpostError):
    """The configuration is invalid; carries every problem found at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{len(problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in problems
            )
        super().__init__(message)


class NotFoundError(OutpostError):
    """A named thing (connection slug, file) does not exist."""


class ConflictError(OutpostError):
    """The change conflicts with what is stored (duplicate name, used data dir)."""


class DataDirLockedError(OutpostError):
    """Another process owns the data dir."""


class KeyError_(OutpostError):
    """A key file is missing, malformed or does not match the stored data."""


class DecryptionError(OutpostError):
    """Ciphertext failed its integrity check (tampered or corrupt)."""


class DriverError(OutpostError):
    """A database driver failed (connect, query); the message never contains a secret."""


class ReadOnlyError(OutpostError):
    """A write was refused because the agent or the request is read-only."""


class BackupError(OutpostError):
    """A backup file could not be written or read, or failed its checks."""
