"""Sharding on a real 3-master Redis Cluster."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from conftest import clustered
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio


async def test_shards_land_on_different_nodes(cluster_ports: list[int]) -> None:
    url = f"redis://127.0.0.1:{cluster_ports[0]}/0"
    async with LSHRS(dim=16, redis_url=url, prefix="spread", shards=12, store=InMemoryStore()) as lsh:
        await lsh.drop()
        base = clustered(1200, 16)
        await lsh.index(np.arange(1200), base)
        per_node = []
        for port in cluster_ports:
            node: Any = Redis(port=port)
            keys = [k async for k in node.scan_iter(match="{spread:*}:s*")]  # record hashes, or record groups
            per_node.append(sum([await node.hlen(k) for k in keys]))
            await node.aclose()
        assert sum(per_node) == 1200
        assert sum(1 for n in per_node if n > 0) >= 2, per_node
        hits = await lsh.query(base[77], top_k=1)
        assert hits[0].id == 77
        assert await lsh.delete(range(0, 1200, 2)) == 600
        assert await lsh.count() == 600
        await lsh.drop()


async def test_cluster_client_can_be_passed_in(cluster_ports: list[int]) -> None:
    from redis.asyncio.cluster import RedisCluster

    client: Any = RedisCluster(host="127.0.0.1", port=cluster_ports[1])
    async with LSHRS(dim=8, redis=client, prefix="given", shards=3, hashing="hyperplane") as lsh:
        await lsh.ingest(9, np.arange(1, 9))
        assert (await lsh.query(np.arange(1, 9), top_k=1))[0].id == 9
        await lsh.drop()
    assert await client.ping()  # a client passed in stays open
    await client.aclose()


async def test_shard_count_mismatch_is_refused(redis_url: str) -> None:
    async with LSHRS(dim=8, redis_url=redis_url, shards=3, hashing="hyperplane") as lsh:
        await lsh.ingest(1, np.ones(8))
    with pytest.raises(ValueError, match="shards: given 5, stored 3"):
        async with LSHRS(dim=8, redis_url=redis_url, shards=5):
            pass
