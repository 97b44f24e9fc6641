#!/usr/bin/env python3
"""The baseline for ``bench_reserve.py``: the same reserve job done in Redis
by redis-py's asyncio client, 256 concurrent tasks, one EVALSHA each.

The script is the loadgen's own (``loadgen/src/target/reserve.lua``: per-user
limit, stock decrement and a reservation key with a TTL, atomically), read
from the repository at run time. The one change: its reservation-key prefix
``lg:res:`` becomes this run's own prefix, so the run never touches the
loadgen's keys (or anyone else's). Every key the run creates starts with
that prefix and is deleted at the end (SCAN + UNLINK), whatever happens.

Needs redis-py (``pip install -e '.[bench]'``) and a Redis at
``--redis`` (default redis://127.0.0.1:6379).

    python bench/bench_redis.py --ops 100000 --tasks 256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import List, Optional

from _common import add_run_args, report, timed_calls

try:
    import redis
    import redis.asyncio as aioredis
except ImportError:  # pragma: no cover
    raise SystemExit("redis-py is missing: pip install -e '.[bench]' (or pip install redis)")

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LUA = PACKAGE_DIR / ".." / ".." / "loadgen" / "src" / "target" / "reserve.lua"
LOADGEN_PREFIX = "'lg:res:'"


async def cleanup(r: "aioredis.Redis", prefix: str) -> int:
    removed = 0
    async for keys in _scan_batches(r, prefix + "*"):
        removed += await r.unlink(*keys)
    return removed


async def _scan_batches(r: "aioredis.Redis", pattern: str):  # type: ignore[no-untyped-def]
    batch: List[bytes] = []
    async for key in r.scan_iter(match=pattern, count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            yield batch
            batch = []
    if batch:
        yield batch


async def bench(args: argparse.Namespace) -> int:
    source = LUA.resolve().read_text()
    if source.count(LOADGEN_PREFIX) != 1:
        raise SystemExit("%s changed: expected one %s literal to re-prefix" % (LUA, LOADGEN_PREFIX))
    prefix = "pybench:%d:" % os.getpid()
    script = source.replace(LOADGEN_PREFIX, "'%sres:'" % prefix)
    sku = args.sku
    stock_key, users_key = "%sstock:%d" % (prefix, sku), "%susers:%d" % (prefix, sku)
    ttl_ms = 3_600_000

    r = aioredis.from_url(args.redis, max_connections=args.tasks + 4)
    try:
        config = await r.config_get("appendonly")
        config.update(await r.config_get("appendfsync"))
        await r.set(stock_key, args.ops)
        sha = await r.script_load(script)
        async def call(user: int) -> Optional[int]:
            # KEYS stock, users; ARGV user, qty, limit, reservation_id, ttl_ms, sku
            code = int(await r.evalsha(sha, 2, stock_key, users_key, user, 1, 1, user + 1, ttl_ms, sku))
            return None if code == 1 else code

        run = await timed_calls(call, range(args.ops), args.tasks, args.max_seconds)
        left = int(await r.get(stock_key) or 0)
    finally:
        removed = await cleanup(r, prefix)
        await r.aclose() if hasattr(r, "aclose") else await r.close()

    head = {
        "target": "redis (reserve.lua via EVALSHA)",
        "redis": args.redis,
        "redis_config": {k: v for k, v in config.items()},
        "redis_py": redis.__version__,
        "tasks": args.tasks,
    }
    report(head, run, {"keys_deleted": removed}, args.json)
    ok = not run.failures and left == args.ops - run.ops
    if not ok:
        print("FAILED: %d refusals (first %r); stock left %d" % (len(run.failures), run.failures[:1], left))
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    add_run_args(p)
    return asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
