"""Running the real `outpost` command and agent processes in tests, and small local servers
(a silent TCP listener, an HTTP file server) for the drivers' network tests."""

from __future__ import annotations

import functools
import http.server
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

OUTPOST = [sys.executable, "-m", "outpost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Agent:
    """An `outpost` installation in a temp dir: config file, data dir, optional key."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = {
            "data_dir": str(self.root / "data"),
            "api": {"client_bind_addresses": [f"127.0.0.1:{self.port}"]},
            "checks": {"interval": 3600},
            **self.config,
        }
        self.write_config()

    @property
    def config_path(self) -> Path:
        return self.root / "agent.json"

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OUTPOST_") or k.startswith("OUTPOST_TEST_")
        }
        env["OUTPOST_CONFIG"] = str(self.config_path)
        env["COLUMNS"] = "200"
        env.update(extra or {})
        return env

    def run(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> Result:
        proc = subprocess.run(
            [*OUTPOST, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(env),
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self.run(*args, **kwargs)
        assert result.code == 0, f"outpost {' '.join(args)} failed: {result.err}{result.out}"
        return result

    def fails(self, *args: str, code: int = 1, **kwargs: Any) -> Result:
        result = self.run(*args, **kwargs)
        assert result.code == code, (
            f"outpost {' '.join(args)} exited {result.code}, expected {code}: "
            f"{result.err}{result.out}"
        )
        return result

    def with_key(self) -> Agent:
        """Generate a key with `outpost key generate` and point key_path at it."""
        path = self.root / "agent.key"
        self.ok("key", "generate", str(path))
        self.config["key_path"] = str(path)
        self.write_config()
        return self

    def list_json(self) -> list[dict[str, Any]]:
        data = self.ok("connections", "list", "--format", "json").json
        assert isinstance(data, list)
        return data

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = open(self.root / "agent.log", "a")  # noqa: SIM115 - owned by the process
        return subprocess.Popen(
            [*OUTPOST, "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env(env),
        )

    def log(self) -> str:
        path = self.root / "agent.log"
        return path.read_text() if path.exists() else ""

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @contextmanager
    def serving(
        self, *args: str, env: dict[str, str] | None = None
    ) -> Iterator[subprocess.Popen[str]]:
        proc = self.start(*args, env=env)
        try:
            wait_for(lambda: self.ready() or proc.poll() is not None, 30, "the agent to be ready")
            assert proc.poll() is None, f"agent exited {proc.returncode}: {self.log()}"
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never sends a byte.

    A thread accepts (so clients get past the handshake whatever the backlog) and holds every
    connection open until exit, when the accepted sockets and the server are closed.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    wake_reader, wake_writer = socket.socketpair()
    accepted: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.setblocking(False)

        def accept() -> None:
            with selectors.DefaultSelector() as selector:
                selector.register(server, selectors.EVENT_READ)
                selector.register(wake_reader, selectors.EVENT_READ)
                while True:
                    for key, _ in selector.select():
                        if key.fileobj is wake_reader:
                            return
                        try:
                            conn, _ = server.accept()
                        except OSError:  # e.g. the client gave up before we got to it
                            continue
                        accepted.append(conn)

        thread = threading.Thread(target=accept, name="silent-listener", daemon=True)
        thread.start()
        try:
            yield int(server.getsockname()[1])
        finally:
            wake_writer.send(b"\0")
            thread.join(timeout=5)
    finally:
        for conn in accepted:
            conn.close()
        server.close()
        wake_reader.close()
        wake_writer.close()


def refused_port() -> int:
    """A port on 127.0.0.1 that refuses connections: bound for a moment, then closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its directory; /stream/NAME sends NAME without a Content-Length."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/stream/"):
            path = Path(self.directory) / self.path.removeprefix("/stream/")
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(str(path)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()


class _FileHTTPServer(http.server.ThreadingHTTPServer):
    """Stays quiet when a client hangs up early (size limits, timeouts); reports the rest."""

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)


@dataclass
class FileServer:
    """A running HTTP server on 127.0.0.1 serving the files under ``root``."""

    root: Path
    base: str

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@contextmanager
def serve_files(root: Path) -> Iterator[FileServer]:
    """Serve ``root`` (created if missing) over HTTP on 127.0.0.1 and a free port."""
    root.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_FileHandler, directory=str(root))
    httpd = _FileHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="file-server", daemon=True)
    thread.start()
    try:
        yield FileServer(root, f"http://127.0.0.1:{httpd.server_port}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def files_in(directory: Path) -> list[str]:
    """The names of the files in ``directory``, sorted; none when it does not exist."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []
