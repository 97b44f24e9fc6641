"""Following the leader of a real three-node cluster (etcd decides who
leads): the client is given every node's address, finds the leader,
survives the leader's SIGKILL under load, and every reservation it was
told about is on the new leader exactly once, with its original expiry.

Needs ``etcd`` on PATH (``apt-get install etcd-server``; ``.ci/run``
installs it); fails, saying so, without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

from harness import ADMIN, CHECKOUT, ClusterNode, Etcd, new_tempdir, run
from stampede import AsyncClient, ClusterReply, NodeRole, Status, new_reservation_id


async def describe(addr: str) -> Optional[ClusterReply]:
    client = AsyncClient(addr, ADMIN, max_attempts=1, connect_timeout=0.5, request_timeout=2)
    try:
        return await client.cluster()
    except Exception:
        return None
    finally:
        await client.close()


async def wait_leader(nodes: List[ClusterNode], alive: List[bool], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, node in enumerate(nodes):
            if alive[i]:
                reply = await describe(node.addr)
                if reply is not None and reply.role is NodeRole.LEADER:
                    return i
        await asyncio.sleep(0.05)
    raise AssertionError("no leader within %.0f s" % timeout)


async def wait_caught_up(nodes: List[ClusterNode], alive: List[bool], timeout: float) -> int:
    """The leader's index once it reports every other live node streaming
    and durable up to its own head."""
    deadline = time.monotonic() + timeout
    while True:
        leader = await wait_leader(nodes, alive, timeout)
        reply = await describe(nodes[leader].addr)
        if reply is not None and reply.nodes:
            head = reply.nodes[0].durable_lsn
            others = [n.id for i, n in enumerate(nodes) if alive[i] and i != leader]
            if all(any(m.id == o and m.streaming and m.durable_lsn >= head for m in reply.nodes) for o in others):
                return leader
        assert time.monotonic() < deadline, "standbys did not catch up; the leader says %r" % (reply,)
        await asyncio.sleep(0.05)


def test_the_client_follows_the_leader_through_a_failover() -> None:
    root = new_tempdir("cluster")
    etcd = Etcd(root)
    nodes = [ClusterNode(i, root, etcd, "py%d" % os.getpid()) for i in range(3)]
    alive = [False] * 3
    try:
        for i, node in enumerate(nodes):
            node.start()
            alive[i] = True

        async def main() -> None:
            leader = await wait_leader(nodes, alive, 30)
            # The leader listed last: the client has to find it.
            addrs = [n.addr for i, n in enumerate(nodes) if i != leader] + [nodes[leader].addr]
            async with AsyncClient(addrs, ADMIN) as admin:
                assert admin.current_node == nodes[leader].addr
                assert (await admin.create_sale(1, 100_000, 1, 3_600_000)).status is Status.OK
            # A standby asked directly answers not_leader (and names the leader).
            standby = nodes[(leader + 1) % 3].addr
            single = AsyncClient(standby, CHECKOUT, max_attempts=1)
            assert (await single.reserve(1, 1, 1)).status is Status.NOT_LEADER
            reply = await single.cluster()
            assert (reply.role, reply.leader_addr) == (NodeRole.STANDBY, nodes[leader].addr)
            await single.close()

            client = AsyncClient(addrs, CHECKOUT, connections=2, failover_timeout=20)
            await client.connect()
            told: Dict[int, Tuple[int, int]] = {}  # id -> (user, expires_at)
            for user in range(50):
                rid = new_reservation_id()
                o = await client.reserve(1, user, 1, rid)
                assert o.status is Status.RESERVED
                told[rid] = (user, o.detail)
            await wait_caught_up(nodes, alive, 30)

            # Load while the leader dies: 16 tasks buying until 200 purchases
            # after the kill have been acknowledged (bounded by count and time).
            stop = asyncio.Event()
            acked_after_kill: List[int] = []
            killed: List[float] = []

            async def worker(w: int) -> None:
                for k in range(1000):
                    if stop.is_set():
                        return
                    user = 1000 + w * 1000 + k
                    rid = new_reservation_id()
                    o = await client.reserve(1, user, 1, rid)
                    assert o.status is Status.RESERVED, o
                    told[rid] = (user, o.detail)
                    if killed:
                        acked_after_kill.append(rid)
                    await asyncio.sleep(0.005)

            tasks = [asyncio.ensure_future(worker(w)) for w in range(16)]
            await asyncio.sleep(0.3)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, nodes[leader].kill)
            alive[leader] = False
            killed.append(time.monotonic())
            deadline = time.monotonic() + 30
            while len(acked_after_kill) < 200 and time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            assert len(acked_after_kill) >= 200, "the sale went on after the failover"
            print("failover: %d purchases acknowledged after the kill, within %.2f s" % (len(acked_after_kill), time.monotonic() - killed[0]))
            new_leader = await wait_leader(nodes, alive, 20)
            assert new_leader != leader
            assert client.current_node == nodes[new_leader].addr
            assert client.failover_retries > 0

            # Everything the client was told is on the new leader, once.
            again = await asyncio.gather(*[client.reserve(1, u, 1, rid) for rid, (u, _) in told.items()])
            assert [(o.status, o.detail) for o in again] == [(Status.RESERVED, exp) for _, exp in told.values()]
            status = await client.status(1)
            assert (status.reserved, status.reservations) == (len(told), len(told)), status
            await client.close()

        run(main(), timeout=120)
    finally:
        for node in nodes:
            node.kill()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
