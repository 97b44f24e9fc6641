#!/usr/bin/env python3
"""Reservations per second from one Python process: asyncio, 256 concurrent
tasks, each reserving one unit for a user of its own, against a real
``stampede-server``.

By default the script starts a fresh server itself (the repository's
``target/release/stampede-server``, a temporary data dir, a free port on
127.0.0.1, default settings: fsync durability) and stops it by PID at the
end; ``--server HOST:PORT`` (token in ``$STAMPEDE_TOKEN``, admin role
needed to create the sale) measures a running one instead.

The run is bounded by ``--ops`` and ``--max-seconds``, whichever comes
first. Every reservation must be answered ``reserved``, and the sale's
counters must agree at the end, or the script exits 1.

    python bench/bench_reserve.py --ops 100000 --tasks 256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACKAGE_DIR))

from stampede import AsyncClient, Status  # noqa: E402
from stampede.checksum import IMPLEMENTATION  # noqa: E402

from _common import add_run_args, report, timed_calls  # noqa: E402

ADMIN_TOKEN = "bench-admin"


def start_server(binary: Path, data_dir: Path) -> Tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAMPEDE_")}
    env.update(STAMPEDE_ADMIN_TOKEN=ADMIN_TOKEN, STAMPEDE_CHECKOUT_TOKEN="bench-checkout", RUST_LOG="warn")
    proc = subprocess.Popen(
        [str(binary), "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--wal-retention", "snapshot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    prefix = "stampede-server listening on "
    if not line.startswith(prefix):
        proc.kill()
        raise SystemExit("the server did not start: %r" % line)
    return proc, line[len(prefix) :].strip()


async def bench(addr: str, token: str, args: argparse.Namespace) -> int:
    sku = args.sku
    async with AsyncClient(addr, token) as admin:
        created = await admin.create_sale(sku, args.ops, 1, 3_600_000, hot=args.hot)
        if created.status is not Status.OK:
            raise SystemExit("cannot create sale %d: %s" % (sku, created.status))

    client = AsyncClient(addr, token, connections=args.connections, coalesce=not args.no_coalesce)
    await client.connect()
    # Warm up (connections, code paths) outside the measurement.
    warm = await client.reserve(sku, 1 << 40, 1)
    assert warm.status is Status.RESERVED, warm

    async def call(user: int) -> Optional[object]:
        outcome = await client.reserve(sku, user, 1)
        return None if outcome.status is Status.RESERVED else outcome

    run = await timed_calls(call, range(args.ops - 1), args.tasks, args.max_seconds)
    status = await client.status(sku)
    stats = client.stats
    await client.close()

    head = {
        "target": "stampede",
        "addr": addr,
        "tasks": args.tasks,
        "connections": args.connections,
        "coalesce": not args.no_coalesce,
        "crc32c": IMPLEMENTATION,
    }
    tail = {"frames_sent": stats.frames_sent, "batches_sent": stats.batches_sent, "retries": stats.retries}
    report(head, run, tail, args.json)
    ok = not run.failures and status.reserved == run.ops + 1
    if not ok:
        failures = run.failures
        print("FAILED: %d refusals (first %r); server says reserved=%d" % (len(failures), failures[:1], status.reserved))
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="a running server (default: start a fresh one)")
    p.add_argument("--server-bin", default=str(PACKAGE_DIR / ".." / ".." / "target" / "release" / "stampede-server"))
    add_run_args(p)
    p.add_argument("--connections", type=int, default=2, help="client connections (default %(default)s)")
    p.add_argument("--no-coalesce", action="store_true", help="one frame per call (no BATCH packing)")
    p.add_argument("--hot", action="store_true", help="create the sale with the hot flag")
    args = p.parse_args()

    if args.server:
        return asyncio.run(bench(args.server, os.environ.get("STAMPEDE_TOKEN", ""), args))
    binary = Path(args.server_bin)
    if not binary.is_file():
        raise SystemExit("%s is missing: cargo build --release -p stampede --bin stampede-server" % binary)
    data_dir = Path(tempfile.mkdtemp(prefix="stampede-bench-"))
    proc: Optional[subprocess.Popen] = None  # type: ignore[type-arg]
    try:
        proc, addr = start_server(binary, data_dir)
        return asyncio.run(bench(addr, ADMIN_TOKEN, args))
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
