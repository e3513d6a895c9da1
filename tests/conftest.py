"""Fixtures: real Redis, Redis Cluster and PostgreSQL servers on loopback.

Every test that takes ``redis_url`` runs twice: on a single Redis and on a
3-master Redis Cluster, each emptied before the test.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, settings
from pytest_redis import factories
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from lshrs import LSHRS
from lshrs._index import group_of
from servers import postgres, redis_cluster

redis_proc = factories.redis_proc(port=None)

# tests/breakages.py only needs a property test to fail, not its smallest
# failing case: shrinking one took 3.5 of CI's minutes.
settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
if os.environ.get("LSHRS_NO_SHRINK"):
    settings.load_profile("no-shrink")

#: The id a deleted id's change-log entries are overwritten with.
TOMBSTONE = -(2**63)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def cluster_ports() -> Iterator[list[int]]:
    with redis_cluster(masters=3) as ports:
        yield ports


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    with postgres() as server:
        yield server.url


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["kmeans", "hyperplane"])
def hashing(request: pytest.FixtureRequest) -> str:
    """Every test that opens an index through ``make_lsh`` runs with both hash families."""
    return str(request.param)


@pytest.fixture
def shards(backend: str) -> int:
    """Default shard count of the suite: several on the cluster, to spread over nodes."""
    return 4 if backend == "cluster" else 1


@pytest.fixture
async def redis_url(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[str]:
    """URL of an empty Redis: a single server, then a cluster."""
    if backend == "redis":
        proc = request.getfixturevalue("redis_proc")
        url = f"redis://{proc.host}:{proc.port}/0"
        client: Any = Redis.from_url(url)
    else:
        ports = request.getfixturevalue("cluster_ports")
        url = f"redis://127.0.0.1:{ports[0]}/0"
        client = RedisCluster.from_url(url)
    await client.flushall()
    await client.aclose()
    yield url


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Any]:
    """A plain client on the same server(s), for inspecting the keyspace."""
    client: Any = Redis.from_url(redis_url)
    if (await client.info("cluster")).get("cluster_enabled"):
        await client.aclose()
        client = RedisCluster.from_url(redis_url)
    yield client
    await client.aclose()


_prefixes = itertools.count()


@pytest.fixture
async def make_lsh(redis_url: str, shards: int, hashing: str) -> AsyncIterator[Callable[..., Awaitable[LSHRS]]]:
    """Opens LSHRS objects on the test's Redis and closes them afterwards,
    with the test's hash family unless bands are given."""
    opened: list[LSHRS] = []

    async def make(**options: Any) -> LSHRS:
        options.setdefault("dim", 32)
        options.setdefault("expected_size", 10_000)
        options.setdefault("shards", shards)
        if "num_bands" not in options and "rows_per_band" not in options:
            options.setdefault("hashing", hashing)
        lsh = LSHRS(redis_url=redis_url, **options)
        await lsh.open()
        opened.append(lsh)
        return lsh

    yield make
    for lsh in opened:
        await lsh.close()


async def keyspace(client: Any) -> dict[bytes, Any]:
    """Every key with its type and value: a dump to compare before and after."""
    keys = [key async for key in client.scan_iter(count=1000)]
    kinds = [kind if isinstance(kind, str) else kind.decode() for kind in await _pipelined(client, "TYPE", keys)]
    read = {"set": "SMEMBERS", "hash": "HGETALL", "list": "LRANGE", "string": "GET"}
    values = await _pipelined(client, [read.get(kind, "GET") for kind in kinds], keys)
    shape = {"set": frozenset, "hash": dict, "list": tuple}
    return {
        key: (kind, shape.get(kind, lambda value: value)(value))
        for key, kind, value in zip(keys, kinds, values, strict=True)
    }


async def _pipelined(client: Any, command: str | list[str], keys: list[bytes], chunk: int = 2000) -> list[Any]:
    """``command`` (one, or one a key) on every key, by pipelines of ``chunk``:
    a hyperplane index holds a bucket key per band and signature, too many
    for a round trip each (that took 40 s of a test on a cluster)."""
    commands = [command] * len(keys) if isinstance(command, str) else command
    values: list[Any] = []
    for start in range(0, len(keys), chunk):
        pipe = client.pipeline(transaction=False)
        for name, key in zip(commands[start : start + chunk], keys[start : start + chunk], strict=True):
            pipe.execute_command(name, key, *((0, -1) if name == "LRANGE" else ()))
        values.extend(await pipe.execute())
    return values


async def read_keys(client: Any, keys: list[bytes], chunk: int = 1000) -> list[Any]:
    """GET of every key, by an MGET of up to ``chunk`` keys that share a hash
    tag (one slot), so it also works on a cluster."""
    by_tag: dict[bytes, list[int]] = {}
    for at, key in enumerate(keys):
        by_tag.setdefault(key.split(b"}", 1)[0], []).append(at)
    values: list[Any] = [None] * len(keys)
    for places in by_tag.values():
        for start in range(0, len(places), chunk):
            part = places[start : start + chunk]
            for at, value in zip(part, await client.execute_command("MGET", *(keys[i] for i in part)), strict=True):
                values[at] = value
    return values


def stored_id(lsh: LSHRS, id_: int) -> bytes:
    """An id as the index's buckets and record fields hold it: its low 4
    bytes (unsigned), or all 8, little-endian (written out here, not with
    lshrs's own packing)."""
    width = lsh.config.id_bytes
    return id_.to_bytes(width, "little", signed=width == 8)


def bucket_members(lsh: LSHRS, value: bytes) -> np.ndarray:
    """The ids of a bucket string."""
    assert len(value) % lsh.config.id_bytes == 0, f"not a string of {lsh.config.id_bytes}-byte ids"
    return np.frombuffer(value, "<u4" if lsh.config.id_bytes == 4 else "<i8").astype(np.int64)


async def index_state(client: Any, lsh: LSHRS, leases: bool = False) -> dict[int, bytes]:
    """Records of the prefix, after checking that they and the buckets agree
    exactly: every id sits in one bucket per table (band), the one its record
    names, and no bucket holds an id without a record. ``leases`` allows write
    leases left by writes given up on a frozen server (they expire)."""
    signatures: dict[int, bytes] = {}
    buckets: dict[tuple[bytes, int], set[int]] = {}
    logs: list[set[int]] = []
    held: Counter[int] = Counter()  # records a shard holds
    counted: dict[int, int] = {}  # what a grouped shard's id count says
    group_of_id: dict[int, int] = {}
    id_bytes = lsh.config.id_bytes  # an id's bytes in a bucket and a record field: 4 (unsigned) or 8

    def field_id(field: bytes) -> int:
        assert len(field) == id_bytes, f"a record field of {len(field)} bytes in an index of {id_bytes}-byte ids"
        return int.from_bytes(field, "little", signed=id_bytes == 8)

    keys = [key async for key in client.scan_iter(match=f"{{{lsh.prefix}:*}}:*", count=1000)]
    bucket_keys = [key for key in keys if key.split(b"}:", 1)[1].startswith(b"b")]
    bucket_values = dict(zip(bucket_keys, await read_keys(client, bucket_keys), strict=True))
    for key in keys:
        tag, kind = key.split(b"}:", 1)
        shard = int(tag.rsplit(b":", 1)[1])
        if kind == b"s" or kind.startswith(b"s:"):  # one record hash a shard, or its record groups
            for id_, sig in (await client.hgetall(key)).items():
                signatures[field_id(id_)] = sig
                held[shard] += 1
                if kind != b"s":
                    group_of_id[field_id(id_)] = int(kind[2:])
        elif kind == b"n":
            counted[shard] = int(await client.get(key))
        elif kind == b"g":  # the shard's generation counter, not an id's data
            assert int(await client.get(key)) >= 0
        elif kind == b"k":  # write leases: none may outlive the write that took them
            assert leases, f"a lease was left behind: {await client.hgetall(key)}"
        elif kind == b"l":  # the change log: recently written ids, each still indexed
            logged = {int.from_bytes(i, "little", signed=True) for i in await client.lrange(key, 0, -1)}
            logs.append(logged - {TOMBSTONE})
        else:
            assert kind.startswith(b"b"), key
            members = bucket_members(lsh, bucket_values[key]).tolist()
            assert len(members) == len(set(members)), f"an id appears twice in bucket {key!r}"
            buckets[(kind[1:], int(tag.rsplit(b":", 1)[1]))] = set(members)
    assert all(buckets.values()), "an empty bucket was left behind"
    groups = (await lsh._ready()).sharded.groups
    if groups:  # every record in the group its id names, and each shard's count right
        ids = np.array(sorted(group_of_id), dtype=np.int64)
        assert len(group_of_id) == len(signatures), "a grouped index holds a record outside its groups"
        assert group_of(ids, groups).tolist() == [group_of_id[i] for i in ids.tolist()]
        assert {s: c for s, c in counted.items() if c} == dict(held), "a shard's id count is off"
    else:
        assert not group_of_id and not counted, "records in groups, or a count, in a one-hash layout"
    for logged in logs:
        assert logged <= set(signatures), f"the change log names deleted ids {logged - set(signatures)}"
    expected: dict[bytes, set[int]] = {}
    config = lsh.config
    if config.hashing == "kmeans":  # a record is a 4-byte bucket number (two when spilled), then a sketch
        tables, width = 1 + config.spill, 4
        size = 4 * tables + (config.code_bytes or config.sketch_bits // 8)
    else:
        tables, width = config.num_bands, (config.rows_per_band + 7) // 8
        size = tables * width
    for id_, sig in signatures.items():
        assert len(sig) == size
        for band in range(tables):
            expected.setdefault(bytes((band,)) + sig[band * width : (band + 1) * width], set()).add(id_)
    actual: dict[bytes, set[int]] = {}
    for (suffix, _shard), members in buckets.items():
        actual.setdefault(suffix, set()).update(members)
    assert actual == expected
    return signatures


async def planned_probes(lsh: LSHRS, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The probes each later query of ``lsh`` plans with, appended as it plans."""
    family = (await lsh._ready()).family
    assert family is not None
    asked: list[int] = []
    plan = family.plan
    monkeypatch.setattr(family, "plan", lambda unit, probes: asked.append(probes) or plan(unit, probes))
    return asked


def assert_found_itself(hits: list[Any], id_: int) -> None:
    """A vector's own query without a store: the id comes first, scored by the
    sketch's estimate, near 1 (codes estimate about 0.8 for a vector unlike
    those they were fitted on; a stale sketch of a moved id, about -1)."""
    assert hits and hits[0].id == id_ and not hits[0].exact and hits[0].score > 0.5, (id_, hits[:1])


def clustered(n: int, dim: int, *, centers: int = 50, spread: float = 0.15, seed: int = 7) -> np.ndarray:
    """Unit vectors around random centres: a corpus with clear neighbourhoods."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, dim))
    points = middle[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    scores = queries @ unit.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
