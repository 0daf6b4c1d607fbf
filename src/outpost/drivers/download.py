"""Fetch the file behind a file-based driver's ``source_url`` (SQLite, CSV).

``source_url`` is either

* an ``http://`` or ``https://`` URL: the file is downloaded (streamed, with httpx) into the
  agent's cache directory (``DriverContext.cache_dir``, created with mode 0700) under a name
  derived from a hash of the URL. It is written to a temporary file in the same directory and
  renamed into place only when complete, so a failed or refused download never leaves a half
  file behind, and a reader that already has the previous copy open keeps reading it;
* a ``file://`` URL or a plain local path: the file is used in place (never copied).

Size: a download is refused as soon as the announced ``Content-Length`` or the bytes actually
received exceed ``DriverContext.max_download_bytes``; the partial file is deleted.

Timeout: ``timeout`` is the network idle limit (seconds allowed to connect, and to wait for
each piece of data), not a total: a large file that keeps arriving is not cut off, a server
that stops answering is.

Freshness (the caching policy the drivers use): ``max_age`` is how old a cached download may
be and still be used. A connection test always downloads again (``max_age=0``: the test shows
the data as it is now); queries reuse a copy younger than :data:`QUERY_MAX_AGE_SECONDS` (60 s),
so a burst of queries (a dashboard, a schema inspection) downloads the file once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx

from outpost.drivers.base import DriverContext
from outpost.errors import DriverError

#: How long a downloaded copy serves queries before it is downloaded again.
QUERY_MAX_AGE_SECONDS = 60.0

#: Bytes read from the network per step (and per progress report at most).
CHUNK_SIZE = 64 * 1024

_REMOTE_SCHEMES = ("http", "https")

_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}


def is_remote(source_url: str) -> bool:
    """True when SOURCE_URL is downloaded (http/https), False for a local file."""
    return urlsplit(source_url.strip()).scheme.lower() in _REMOTE_SCHEMES


def check_source_url(source_url: str) -> str:
    """Validate SOURCE_URL's form (for the options models); return it stripped.

    Accepts http(s):// and file:// URLs and plain paths; anything else raises ValueError.
    """
    value = source_url.strip()
    if not value:
        raise ValueError("give an http(s):// URL, a file:// URL or a local path")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme in _REMOTE_SCHEMES:
        if not parts.hostname:
            raise ValueError(f"the URL {safe_url(value)} has no host name")
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"a file:// URL must name a file on this machine, not on {parts.netloc!r}"
            )
        if not parts.path:
            raise ValueError("the file:// URL has no path")
    elif len(scheme) > 1:  # one letter is a Windows drive (C:\...), i.e. a path
        raise ValueError(
            f"unsupported URL scheme {parts.scheme!r}; use http(s)://, file:// or a local path"
        )
    return value


def safe_url(source_url: str) -> str:
    """SOURCE_URL fit for messages: no user name or password, no query string.

    The query string is dropped because it often carries a token (pre-signed URLs).
    """
    parts = urlsplit(source_url.strip())
    if parts.scheme.lower() not in (*_REMOTE_SCHEMES, "file"):
        return source_url.strip()
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def source_name(source_url: str) -> str:
    """The file name SOURCE_URL points at (last path segment), '' when there is none."""
    value = source_url.strip()
    parts = urlsplit(value)
    is_url = parts.scheme.lower() in (*_REMOTE_SCHEMES, "file")
    return Path(unquote(parts.path) if is_url else value).name


def local_path(source_url: str) -> Path:
    """The local path of a file:// URL or plain path (not checked for existence)."""
    value = source_url.strip()
    parts = urlsplit(value)
    if parts.scheme.lower() == "file":
        return Path(url2pathname(parts.path))
    return Path(value).expanduser()


def default_cache_dir() -> Path:
    """Where downloads go when the agent gives no cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "outpost" / "downloads"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; 536870912 -> '512 MiB'."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            if unit == "bytes":
                return f"{n} bytes"
            return f"{size:.1f}".removesuffix(".0") + f" {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fetch_source(
    source_url: str,
    context: DriverContext,
    *,
    timeout: float,
    max_age: float = 0.0,
) -> Path:
    """The local file behind SOURCE_URL, downloading it first when it is an http(s) URL.

    A cached download younger than MAX_AGE seconds is reused (0: always download). Errors are
    DriverErrors of one sentence naming the connection and the URL (without credentials).
    """
    if not is_remote(source_url):
        return _local_source(source_url, context)
    cache_dir = context.cache_dir or default_cache_dir()
    _make_private_dir(cache_dir, context)
    target = cache_dir / _cache_name(source_url)
    with _lock_for(target):
        if max_age > 0:
            try:
                age = time.time() - target.stat().st_mtime
            except FileNotFoundError:
                age = None
            if age is not None and 0 <= age < max_age:
                return target
        _download(source_url, target, context, timeout=timeout)
    return target


# --- internals ------------------------------------------------------------------------------


def _fail(context: DriverContext, what: str, reason: str) -> DriverError:
    return DriverError(f"{what} for connection {context.connection!r}: {reason.rstrip('.')}.")


def _local_source(source_url: str, context: DriverContext) -> Path:
    path = local_path(source_url)
    if not path.exists():
        raise _fail(context, f"Cannot open {path}", "the file does not exist")
    if not path.is_file():
        raise _fail(context, f"Cannot open {path}", "it is not a regular file")
    if not os.access(path, os.R_OK):
        raise _fail(context, f"Cannot open {path}", "the agent has no permission to read it")
    return path.resolve()


def _cache_name(source_url: str) -> str:
    digest = hashlib.sha256(source_url.strip().encode()).hexdigest()[:32]
    suffix = Path(source_name(source_url)).suffix.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,10}", suffix):
        suffix = ""
    return f"download-{digest}{suffix}"


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def _make_private_dir(path: Path, context: DriverContext) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, 0o700)
    except OSError as exc:
        raise _fail(
            context, f"Cannot create the download cache directory {path}", exc.strerror or str(exc)
        ) from None


def _download(source_url: str, target: Path, context: DriverContext, *, timeout: float) -> None:
    shown = safe_url(source_url)
    what = f"Cannot download {shown}"
    limit = context.max_download_bytes
    too_big = (
        f"the file is larger than the download limit of {human_bytes(limit)} "
        "(raise the connection's max_download_bytes option if it is expected)"
    )
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=target.parent)
    tmp = Path(tmp_name)
    done = False
    try:
        with (
            os.fdopen(fd, "wb") as out,
            httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True) as client,
            client.stream("GET", source_url.strip()) as response,
        ):
            if response.status_code >= 400:
                reason = response.reason_phrase or ""
                raise _fail(
                    context, what, f"the server answered {response.status_code} {reason}".strip()
                )
            total = _content_length(response)
            if total is not None and total > limit:
                raise _fail(context, what, too_big)
            written = reported = 0
            for chunk in response.iter_bytes(CHUNK_SIZE):
                written += len(chunk)
                if written > limit:
                    raise _fail(context, what, too_big)
                out.write(chunk)
                # bytes as they came over the wire (compressed, like Content-Length)
                received = response.num_bytes_downloaded
                if context.progress is not None and received > reported:
                    reported = received
                    context.progress(received, total)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        done = True
    except DriverError:
        raise
    except httpx.TimeoutException:
        raise _fail(context, what, f"the server did not answer within {timeout:g} s") from None
    except httpx.ConnectError as exc:
        raise _fail(context, what, _scrub_url(_connect_reason(exc), source_url)) from None
    except httpx.TooManyRedirects:
        raise _fail(context, what, "too many redirects") from None
    except httpx.HTTPError as exc:
        raise _fail(context, what, _scrub_url(_http_reason(exc), source_url)) from None
    except OSError as exc:
        raise _fail(
            context, what, f"cannot write to {target.parent}: {exc.strerror or exc}"
        ) from None
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _scrub_url(text: str, source_url: str) -> str:
    """TEXT without SOURCE_URL's user name, password or query string."""
    parts = urlsplit(source_url.strip())
    text = text.replace(source_url.strip(), safe_url(source_url))
    for secret in (parts.password, parts.query):
        if secret:
            text = text.replace(secret, "********")
    return text


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _connect_reason(exc: httpx.ConnectError) -> str:
    text = str(exc)
    lowered = text.lower()
    if "refused" in lowered:
        return "the connection was refused (is the server running and the port right?)"
    if (
        "name or service not known" in lowered
        or "nodename nor servname" in lowered
        or ("name resolution" in lowered)
    ):
        return "the host name could not be resolved"
    if "certificate" in lowered:
        return f"the server's TLS certificate was not accepted ({_http_reason(exc)})"
    return f"cannot connect ({_http_reason(exc)})"


def _http_reason(exc: httpx.HTTPError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__
