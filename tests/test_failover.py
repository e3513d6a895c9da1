"""A master of a 3-master, 3-replica Redis Cluster is killed while queries
and ingests run: calls fail with clear errors for a bounded time, then
succeed against the promoted replica without a new client, and reconcile()
makes the index whole again (issue 13)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from conftest import clustered, index_state
from lshrs import LSHRS
from lshrs._admission import Admission, Call
from lshrs.adapters import InMemoryStore
from servers import ClusterNode, redis_cluster_nodes

pytestmark = pytest.mark.anyio

DIM = 32
BASE = clustered(4000, DIM, seed=53)


def roles(port: int) -> dict[int, str]:
    """Every node's role as the node at ``port`` sees it: port -> master/slave/fail."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "nodes"], capture_output=True, text=True, check=True
    ).stdout
    seen = {}
    for line in out.splitlines():
        fields = line.split()
        node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        flags = fields[2]
        seen[node_port] = "fail" if "fail" in flags and "?" not in flags else "master" if "master" in flags else "slave"
    return seen


def replicas_synced(nodes: list[ClusterNode]) -> bool:
    for node in nodes[3:]:
        info = subprocess.run(
            ["redis-cli", "-p", str(node.port), "info", "replication"], capture_output=True, text=True, check=True
        ).stdout
        if "master_link_status:up" not in info:
            return False
    return True


async def test_a_killed_master_fails_over_and_the_client_recovers() -> None:
    with redis_cluster_nodes(masters=3, replicas=1) as nodes:
        deadline = time.monotonic() + 30
        while not replicas_synced(nodes):
            assert time.monotonic() < deadline, "replicas did not sync"
            await asyncio.sleep(0.1)
        store = InMemoryStore()
        lsh = LSHRS(dim=DIM, redis_url=nodes[0].url, store=store, shards=6, timeout=1.0)
        await lsh.index(np.arange(3000), BASE[:3000])
        raw: Any = RedisCluster.from_url(nodes[0].url)
        await raw.initialize()
        # A master that holds some of the index's shards and is not the node the client was given.
        owners = {raw.get_node_from_key(f"{{lshrs:{shard}}}:s").port for shard in range(6)}
        victim = next(node for node in nodes[1:3] if node.port in owners)

        outcomes: list[tuple[float, str]] = []
        stop = False
        next_id = 3000

        async def reader() -> None:
            i = 0
            while not stop:
                started = time.monotonic()
                try:
                    await lsh.query(BASE[i % 3000], top_k=1)
                    outcomes.append((started, "ok"))
                except (redis.exceptions.RedisError, TimeoutError) as exc:  # clear, catchable errors
                    outcomes.append((started, type(exc).__name__))
                    await asyncio.sleep(0.05)
                i += 1

        async def writer() -> None:
            nonlocal next_id
            while not stop:
                try:
                    await lsh.ingest(next_id, BASE[next_id])
                except (redis.exceptions.RedisError, TimeoutError):
                    await asyncio.sleep(0.05)
                next_id += 1
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(reader()) for _ in range(4)] + [asyncio.create_task(writer())]
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(victim.executor.process.pid, signal.SIGKILL)
        promoted_at = None
        while promoted_at is None:
            assert time.monotonic() - killed_at < 30, "no replica was promoted"
            seen = roles(nodes[0].port)
            replica_roles = [seen.get(node.port) for node in nodes[3:]]
            if seen.get(victim.port) == "fail" and replica_roles.count("master") >= 1:
                promoted_at = time.monotonic()
            await asyncio.sleep(0.1)
        await asyncio.sleep(4.0)
        stop = True
        await asyncio.gather(*tasks)

        failures = [at for at, what in outcomes if what != "ok"]
        late = [at for at, what in outcomes if what != "ok" and at > promoted_at + 2.0]
        assert failures, "killing a master must be noticed"
        assert not late, f"calls still failed {max(late) - promoted_at:.1f} s after the failover"
        assert any(what == "ok" and at > promoted_at for at, what in outcomes)

        # Replication is asynchronous: what the old master had not passed on is
        # lost, and a write cut by the failure may sit in the store alone.
        # reconcile() makes the index exactly the store again. The promoted
        # replica may hold a lease whose release the old master never passed
        # on; reconcile waits for it to lapse (30 s), past the 1 s timeout.
        await lsh.reconcile()
        indexed = set(await index_state(raw, lsh))
        held = set((await store.fetch(np.arange(next_id + 1))).ids.tolist())
        assert indexed == held
        await raw.aclose()
        await lsh.close()


async def test_a_connection_closed_under_a_call_is_a_redis_error() -> None:
    """redis-py's cluster client closes connections other tasks are writing
    on when a failover makes it re-read the topology; the AttributeError that
    leaves redis-py reaches the caller as a redis ConnectionError. Our own
    AttributeErrors pass through unchanged."""
    closed = Connection()  # never connected: its writer is None, as after aclose()

    async def write_on_closed() -> None:
        async with Call(Admission(4), None, "query()"):
            await closed._send_packed_command([b"PING\r\n"])

    with pytest.raises(redis.exceptions.ConnectionError, match="closed under this call") as raised:
        await write_on_closed()
    assert isinstance(raised.value.__cause__, AttributeError)

    with pytest.raises(AttributeError):
        async with Call(Admission(4), None, "query()"):
            None.missing  # type: ignore[attr-defined]  # noqa: B018
