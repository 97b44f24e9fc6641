#!/usr/bin/env bash
# Test entry point for CI and developers: creates (or reuses) a venv in
# clients/python/.venv, installs this package in editable mode with its dev
# extra, and runs pytest against a real stampede-server. Non-interactive;
# exits non-zero on any failure. Extra arguments go to pytest.
#
# Needs: Python >= 3.9 (set PYTHON to choose one), the server binary
# (target/release/stampede-server, or STAMPEDE_SERVER_BIN), and etcd on PATH
# for the cluster test.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "run_tests.sh: '$PYTHON' not found: install Python 3.9 or newer (or set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'; then
  echo "run_tests.sh: Python 3.9 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "run_tests.sh: $PYTHON lacks venv/ensurepip (Debian: apt-get install python3-venv)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the package metadata changed (the install is editable,
# so source changes need none).
stamp=.venv/.stampede-installed
want="$(cat pyproject.toml requirements-dev.txt | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing stampede-client (editable) with its dev extra"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  printf '%s' "$want" > "$stamp"
fi

echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
