"""Test harness: real ``stampede-server`` (and etcd) processes on 127.0.0.1.

No mocks: every client test talks to the real server binary, started here
on a free port with its own temporary data dir, and stopped by its PID.
The binary comes from ``$STAMPEDE_SERVER_BIN``, else from the repository's
``target/release`` then ``target/debug`` (found relative to this package:
``clients/python/../../target``). When it is missing the tests *fail*,
saying how to build it: a skipped suite would look green in CI.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Dict, List, Optional, Sequence, TypeVar

#: clients/python
PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: the repository root (clients/python/../..)
REPO_DIR = PACKAGE_DIR.parent.parent
PROTOCOL_DIR = REPO_DIR / "protocol"
TLS_DIR = REPO_DIR / "tests" / "data" / "tls"

ADMIN = "py-admin"
CHECKOUT = "py-checkout"
REPLICATION = "py-replication"

BUILD_HINT = (
    "build it with `cargo build --release -p stampede --bin stampede-server` "
    "(from the repository root), or point STAMPEDE_SERVER_BIN at a built binary"
)

#: How long a server may take to print its address.
START_TIMEOUT_S = 20.0
#: How long a server may take to exit after SIGTERM.
STOP_TIMEOUT_S = 15.0

T = TypeVar("T")


class MissingServer(AssertionError):
    """The server binary is not there (an assertion: the test fails)."""


def server_candidates() -> List[Path]:
    """Where the binary is looked for, in order of preference."""
    env = os.environ.get("STAMPEDE_SERVER_BIN")
    if env:
        return [Path(env)]
    return [
        PACKAGE_DIR / ".." / ".." / "target" / "release" / "stampede-server",
        PACKAGE_DIR / ".." / ".." / "target" / "debug" / "stampede-server",
    ]


def server_binary() -> Path:
    """The first candidate that exists, or ``MissingServer`` saying how to
    build it."""
    candidates = server_candidates()
    for path in candidates:
        if path.is_file() and os.access(str(path), os.X_OK):
            return path.resolve()
    raise MissingServer(
        "stampede-server not found (looked at: %s); %s"
        % (", ".join(str(p.resolve()) for p in candidates), BUILD_HINT)
    )


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_line(stream: Any, timeout: float) -> str:
    """The first line of a child's stdout, waiting at most ``timeout``."""
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class ServerProcess:
    """One ``stampede-server`` child: its own data dir, a free port, stopped
    by PID. ``restart`` brings it back on the same address and data dir."""

    def __init__(
        self,
        data_dir: Path,
        extra: Sequence[str] = (),
        tokens: Optional[Dict[str, str]] = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.binary = server_binary()
        self.data_dir = data_dir
        self.extra = list(extra)
        self.tokens = (
            {"STAMPEDE_ADMIN_TOKEN": ADMIN, "STAMPEDE_CHECKOUT_TOKEN": CHECKOUT} if tokens is None else tokens
        )
        self.log = data_dir.parent / (data_dir.name + ".log")
        self.proc: Optional[subprocess.Popen] = None  # type: ignore[type-arg]
        self.addr = ""
        self._start(listen)

    def _start(self, listen: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STAMPEDE_")}
        env.update(self.tokens)
        env["RUST_LOG"] = "warn"
        cmd = [str(self.binary), "--listen", listen, "--data-dir", str(self.data_dir), "--no-pin", *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        try:
            line = _first_line(self.proc.stdout, START_TIMEOUT_S)
            prefix = "stampede-server listening on "
            if not line.startswith(prefix):
                raise AssertionError(
                    "stampede-server did not start (%s); first stdout line %r; its log:\n%s"
                    % (cmd, line, _tail(self.log))
                )
            self.addr = line[len(prefix) :].strip()
        except BaseException:
            # Whatever went wrong, no server outlives its test.
            self.kill()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL by PID, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def terminate(self) -> int:
        """SIGTERM by PID (a graceful stop); the exit status."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self.kill()
        return code

    def restart(self, attempts: int = 50) -> None:
        """Start again on the same address (after ``kill`` or ``terminate``).
        The port may still be held for a moment: retry, bounded."""
        self.kill()
        last: Optional[BaseException] = None
        for _ in range(attempts):
            try:
                self._start(self.addr)
                return
            except AssertionError as e:
                last = e
                time.sleep(0.1)
        raise AssertionError("could not restart the server on %s: %s" % (self.addr, last))

    def log_tail(self) -> str:
        return _tail(self.log)


def etcd_binary() -> str:
    """etcd for the cluster test; fails saying how to install it."""
    path = shutil.which("etcd")
    if path is None:
        raise AssertionError(
            "etcd not found on PATH: the cluster test needs it. Install it with "
            "`apt-get update && apt-get install -y etcd-server` (bash .ci/run does)"
        )
    return path


class Etcd:
    """An etcd of the test's own: free ports, a temp data dir, stopped by PID."""

    def __init__(self, root: Path) -> None:
        client, peer = free_port(), free_port()
        self.endpoint = "127.0.0.1:%d" % client
        self.dir = root / "etcd"
        self.log = root / "etcd.log"
        cmd = [
            etcd_binary(),
            "--data-dir",
            str(self.dir),
            "--listen-client-urls",
            "http://%s" % self.endpoint,
            "--advertise-client-urls",
            "http://%s" % self.endpoint,
            "--listen-peer-urls",
            "http://127.0.0.1:%d" % peer,
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:%d" % peer,
            "--initial-cluster",
            "default=http://127.0.0.1:%d" % peer,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("etcd did not start on %s:\n%s" % (self.endpoint, _tail(self.log)))
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)


class ClusterNode:
    """One node of a test cluster; its port and data dir survive restarts."""

    def __init__(self, index: int, root: Path, etcd: Etcd, cluster: str) -> None:
        self.id = "n%d" % (index + 1)
        self.addr = "127.0.0.1:%d" % free_port()
        self.dir = root / self.id
        self.etcd = etcd
        self.cluster = cluster
        self.server: Optional[ServerProcess] = None

    def start(self) -> None:
        tokens = {
            "STAMPEDE_ADMIN_TOKEN": ADMIN,
            "STAMPEDE_CHECKOUT_TOKEN": CHECKOUT,
            "STAMPEDE_REPLICATION_TOKEN": REPLICATION,
        }
        extra = ["--etcd", self.etcd.endpoint, "--cluster", self.cluster, "--node-id", self.id]
        self.server = ServerProcess(self.dir, extra, tokens, listen=self.addr)

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()


def new_tempdir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="stampede-py-%s-" % tag))


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run a coroutine to completion, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
