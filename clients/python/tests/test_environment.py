"""What the suite needs from the machine. These fail, not skip, when it is
missing: a suite that skips its server tests would look green in CI."""

from __future__ import annotations

import os
import sys

import pytest

import harness


def test_python_is_recent_enough() -> None:
    assert sys.version_info >= (3, 9), "stampede-client needs Python 3.9 or newer, this is %s" % sys.version


def test_server_binary_is_there() -> None:
    # Fails with how to build it (`cargo build --release -p stampede --bin
    # stampede-server`) when it is missing.
    path = harness.server_binary()
    assert path.is_file()


def test_a_missing_binary_fails_with_how_to_build_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STAMPEDE_SERVER_BIN", str(tmp_path / "no-such-server"))
    with pytest.raises(AssertionError) as e:
        harness.server_binary()
    message = str(e.value)
    assert "cargo build --release -p stampede --bin stampede-server" in message
    assert str(tmp_path / "no-such-server") in message


def test_default_locations_are_relative_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAMPEDE_SERVER_BIN", raising=False)
    release, debug = harness.server_candidates()
    assert release.resolve() == (harness.REPO_DIR / "target" / "release" / "stampede-server").resolve()
    assert debug.resolve() == (harness.REPO_DIR / "target" / "debug" / "stampede-server").resolve()
    assert os.path.samefile(harness.PACKAGE_DIR / ".." / "..", harness.REPO_DIR)
