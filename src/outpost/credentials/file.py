"""``file:/path`` — a file read at every connect (trailing newline stripped; a file readable
by group or others is warned about)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from outpost.credentials.base import Credential, CredentialContext, CredentialSource
from outpost.errors import UsageError

log = logging.getLogger("outpost.credentials")


class FileSource(CredentialSource):
    kind = "file"
    cacheable = False

    def validate(self) -> None:
        if not Path(self.argument).expanduser().is_absolute():
            raise UsageError(f"{self.reference!r}: give an absolute path (file:/path/to/secret).")

    def fetch(self, ctx: CredentialContext) -> Credential:
        path = Path(self.argument).expanduser()
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            text = path.read_text()
        except FileNotFoundError:
            raise self.error(ctx, f"{path} does not exist") from None
        except IsADirectoryError:
            raise self.error(ctx, f"{path} is a directory") from None
        except PermissionError:
            raise self.error(ctx, f"the agent (uid {os.geteuid()}) may not read {path}") from None
        except UnicodeDecodeError:
            raise self.error(ctx, f"{path} is not UTF-8 text") from None
        except OSError as exc:
            raise self.error(ctx, f"{path}: {exc.strerror}") from None
        if mode & 0o077:
            log.warning(
                "secret file %s has mode %04o; it should be 0600 or stricter (chmod 600 %s)",
                path,
                mode,
                path,
            )
        return Credential(password=text.rstrip("\r\n"), fetched_at=self.clock())
