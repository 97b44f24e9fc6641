"""What ``bench_reserve.py`` and ``bench_redis.py`` share, so both targets
are measured the same way: the options, the timed loop of concurrent
tasks over one user sequence, and the report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", type=int, default=100_000, help="reservations to make (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop after this long (default %(default)s)")
    p.add_argument("--tasks", type=int, default=256, help="concurrent asyncio tasks (default %(default)s)")
    p.add_argument("--sku", type=int, default=7_000_001)
    p.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass
class Run:
    ops: int
    seconds: float
    latencies: List[float]
    #: What ``call`` returned for the calls that failed.
    failures: List[object] = field(default_factory=list)

    def percentile_ms(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        return self.latencies[min(len(self.latencies) - 1, int(p * len(self.latencies)))] * 1000


async def timed_calls(
    call: Callable[[int], Awaitable[Optional[object]]],
    users: Iterable[int],
    tasks: int,
    max_seconds: float,
) -> Run:
    """``tasks`` concurrent tasks each take the next user and ``await
    call(user)`` (a failure, or None) until the users or the time run out."""
    next_user = iter(users)
    deadline = time.monotonic() + max_seconds
    latencies: List[float] = []
    failures: List[object] = []

    async def task() -> int:
        done = 0
        clock = time.perf_counter
        for user in next_user:
            if time.monotonic() > deadline:
                break
            t0 = clock()
            failure = await call(user)
            latencies.append(clock() - t0)
            if failure is not None:
                failures.append(failure)
            done += 1
        return done

    started = time.perf_counter()
    counts = await asyncio.gather(*[task() for _ in range(tasks)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Run(ops=sum(counts), seconds=elapsed, latencies=latencies, failures=failures)


def report(head: Dict[str, Any], run: Run, tail: Dict[str, Any], as_json: bool) -> None:
    """Print ``head``, the run's figures, then ``tail``."""
    result = dict(head)
    result.update(
        python=sys.version.split()[0],
        reservations=run.ops,
        seconds=round(run.seconds, 3),
        reservations_per_s=round(run.ops / run.seconds),
        latency_ms_p50=round(run.percentile_ms(0.50), 2),
        latency_ms_p99=round(run.percentile_ms(0.99), 2),
    )
    result.update(tail)
    print(json.dumps(result) if as_json else "\n".join("%-20s %s" % kv for kv in result.items()))
