"""pytest fixtures: a fresh ``stampede-server`` per test (see harness.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest

from harness import ServerProcess


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers (each with its own data dir and port); every one is
    killed by PID when the test ends, and its log printed if the test failed."""
    started: List[ServerProcess] = []

    def start(extra: Sequence[str] = (), **kwargs: object) -> ServerProcess:
        data_dir = tmp_path / ("server%d" % len(started))
        server = ServerProcess(data_dir, extra, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """One server with the test tokens and default settings."""
    return start_server()
