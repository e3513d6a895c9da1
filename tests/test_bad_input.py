"""Bad input gets a clear error and leaves the index byte-for-byte unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conftest import clustered, keyspace
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio

DIM = 32
good = clustered(4, DIM, seed=11)
nan_row = good.copy()
nan_row[1, 3] = np.nan
inf_row = good.copy()
inf_row[2, 0] = np.inf
zero_row = good.copy()
zero_row[0] = 0.0

Call = Callable[[LSHRS], Any]
CASES: list[tuple[str, Call, type[Exception], str]] = [
    ("wrong dim", lambda x: x.index([1, 2, 3, 4], good[:, :16]), ValueError, r"shape \(n, 32\)"),
    ("3-d array", lambda x: x.index([1], good[None]), ValueError, "shape"),
    ("NaN", lambda x: x.index([1, 2, 3, 4], nan_row), ValueError, "row 1 holds NaN"),
    ("inf", lambda x: x.index([1, 2, 3, 4], inf_row), ValueError, "row 2 holds NaN or infinity"),
    ("zero vector", lambda x: x.index([1, 2, 3, 4], zero_row), ValueError, "row 0 is all zeros"),
    ("string vector", lambda x: x.ingest(1, "0.1 0.2"), TypeError, "must be numbers"),
    ("string elements", lambda x: x.ingest(1, ["a"] * DIM), TypeError, "real numbers"),
    ("bool vector", lambda x: x.ingest(1, [True] * DIM), TypeError, "real numbers"),
    ("complex vector", lambda x: x.ingest(1, np.ones(DIM, complex)), TypeError, "real numbers"),
    ("ragged", lambda x: x.index([1, 2], [[1.0] * DIM, [1.0]]), ValueError, "rectangular"),
    ("float id", lambda x: x.ingest(1.5, good[0]), TypeError, "ids must be integers"),
    ("string id", lambda x: x.ingest("7", good[0]), TypeError, "ids must be integers"),
    ("bool id", lambda x: x.ingest(True, good[0]), TypeError, "ids must be integers"),
    ("huge id", lambda x: x.ingest(2**63, good[0]), ValueError, "64-bit"),
    ("huge uint64 ids", lambda x: x.index(np.array([2**63], np.uint64), good[:1]), ValueError, "64-bit"),
    ("ids not a sequence", lambda x: x.index(5, good[:1]), TypeError, "sequence of integers"),
    ("length mismatch", lambda x: x.index([1, 2, 3], good), ValueError, "3 ids but 4 vectors"),
    ("texts mismatch", lambda x: x.index([1, 2, 3, 4], good, texts=["a"]), ValueError, "4 ids but 1 texts"),
    ("empty batch", lambda x: x.index([], np.empty((0, DIM))), ValueError, "empty"),
    ("duplicate ids", lambda x: x.index([1, 2, 2, 3], good), ValueError, "id 2 appears more than once"),
    (
        "only ids",
        lambda x: x.index([1, 2], None),
        TypeError,
        r"^index\(\) takes both ids and vectors, or neither \(to read the store\)$",
    ),
    ("two vectors to ingest", lambda x: x.ingest(1, good[:2]), ValueError, "1 ids but 2 vectors"),
    ("top_k 0", lambda x: x.query(good[0], top_k=0), ValueError, "top_k must be at least 1"),
    ("top_k float", lambda x: x.query(good[0], top_k=2.5), TypeError, "top_k must be an integer"),
    ("top_p 0", lambda x: x.query(good[0], top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    ("top_p above 1", lambda x: x.query(good[0], top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    ("query_many top_p above 1", lambda x: x.query_many(good[:2], top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    ("query wrong dim", lambda x: x.query(np.ones(DIM + 1)), ValueError, r"^vector must have shape \(n, \d+\)"),
    ("query two vectors", lambda x: x.query(good[:2]), ValueError, "query_many"),
    ("query NaN", lambda x: x.query(nan_row[1]), ValueError, r"^vector row 0 holds NaN"),
    ("delete string id", lambda x: x.delete(["x"]), TypeError, "ids must be integers"),
    # 4-byte ids (the default): cut to 4 bytes, 2**32 + 100 would overwrite id 100.
    ("id past 4 bytes", lambda x: x.index([1, 2, 2**32 + 100, 3], good), ValueError, r"id 4294967396 .*id_bytes=8"),
    ("negative id", lambda x: x.ingest(-1, good[0]), ValueError, r"id -1 does not fit .*4-byte ids"),
]


@pytest.mark.parametrize(("name", "call", "error", "message"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_refused_and_writes_nothing(
    make_lsh: Any, raw_redis: Any, name: str, call: Call, error: type[Exception], message: str
) -> None:
    store = InMemoryStore()
    lsh = await make_lsh(dim=DIM, store=store)
    # A learned index trains on its first write, which needs 256 vectors; a
    # hyperplane index needs two (fewer buckets for the keyspace dumps to read).
    count = 300 if lsh.config.hashing == "kmeans" else 2
    await lsh.index(range(100, 100 + count), clustered(count, DIM, seed=3), texts=["t"] * count)
    before = await keyspace(raw_redis)
    with pytest.raises(error, match=message):
        await call(lsh)
    assert await keyspace(raw_redis) == before
    assert len(store) == count


_PREFIX_RULE = "is not allowed: use 1-64 characters from letters, digits, '_', '-' and '.' (no braces, spaces or ':')"
_TIMEOUT_RULE = "timeout must be a positive number of seconds (or None for no limit), got "
_ID_BYTES_RULE = "id_bytes must be 4 (ids 0 to 2**32 - 1) or 8 (any 64-bit id), got "


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"dim": 0}, ValueError, "dim must be at least 1, got 0"),
        ({"dim": "384"}, TypeError, "dim must be an integer, got '384'"),
        ({"num_bands": 0}, ValueError, "num_bands must be at least 1 and at most 255, got 0"),
        ({"num_bands": 300}, ValueError, "num_bands must be at least 1 and at most 255, got 300"),
        ({"rows_per_band": 65}, ValueError, "rows_per_band must be at least 1 and at most 64, got 65"),
        ({"rows_per_band": 0}, ValueError, "rows_per_band must be at least 1 and at most 64, got 0"),
        ({"threshold": 1.0}, ValueError, "threshold must be a cosine in (0, 1), got 1.0"),
        ({"threshold": 0.0}, ValueError, "threshold must be a cosine in (0, 1), got 0.0"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer, got -1"),
        ({"seed": True}, ValueError, "seed must be a non-negative integer, got True"),
        ({"seed": 1.5}, ValueError, "seed must be a non-negative integer, got 1.5"),
        ({"shards": 0}, ValueError, "shards must be at least 1 and at most 4096, got 0"),
        ({"shards": 4097}, ValueError, "shards must be at least 1 and at most 4096, got 4097"),
        ({"prefix": "a{b}"}, ValueError, f"prefix 'a{{b}}' {_PREFIX_RULE}"),
        ({"prefix": ""}, ValueError, f"prefix '' {_PREFIX_RULE}"),
        ({"prefix": "a:b"}, ValueError, f"prefix 'a:b' {_PREFIX_RULE}"),
        (
            {"redis": object()},
            TypeError,
            "redis= takes a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster client, got object",
        ),
        ({"redis_url": "redis://x", "redis": object()}, ValueError, "pass redis_url or redis, not both"),
        ({"progress": "yes"}, TypeError, "progress must be a bool or a callable, got str"),
        ({"hashing": "lsh"}, ValueError, "hashing must be one of 'kmeans', 'hyperplane', got 'lsh'"),
        (
            {"hashing": "kmeans", "num_bands": 8},
            ValueError,
            "num_bands and rows_per_band shape hashing='hyperplane'; a k-means index takes buckets=",
        ),
        ({"buckets": 0}, ValueError, "buckets must be at least 1 and at most 2147483648, got 0"),
        ({"buckets": 2**31 + 1}, ValueError, "buckets must be at least 1 and at most 2147483648, got 2147483649"),
        (
            {"hashing": "hyperplane", "buckets": 64},
            ValueError,
            "buckets= sizes hashing='kmeans'; hyperplanes take num_bands and rows_per_band",
        ),
        ({"rerank": 0}, ValueError, "rerank must be at least 1, got 0"),
        ({"probes": 0}, ValueError, "probes must be at least 1, got 0"),
        ({"max_inflight": 0}, ValueError, "max_inflight must be at least 1, got 0"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be at least 0, got -1"),
        ({"max_waiting": 2.0}, TypeError, "max_waiting must be an integer, got 2.0"),
        ({"max_candidates": "10"}, TypeError, "max_candidates must be an integer, got '10'"),
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
        ({"expected_size": -5}, ValueError, "expected_size must be at least 1, got -5"),
        ({"signature_cache": -1}, ValueError, "signature_cache must be at least 0, got -1"),
        ({"warm_in_background": 1}, TypeError, "warm_in_background must be True or False, got 1"),
        ({"timeout": 0}, ValueError, f"{_TIMEOUT_RULE}0"),
        ({"timeout": -1.0}, ValueError, f"{_TIMEOUT_RULE}-1.0"),
        ({"timeout": "10"}, ValueError, f"{_TIMEOUT_RULE}'10'"),
        ({"timeout": float("nan")}, ValueError, f"{_TIMEOUT_RULE}nan"),
        ({"id_bytes": 2}, ValueError, f"{_ID_BYTES_RULE}2"),
        ({"id_bytes": True}, ValueError, f"{_ID_BYTES_RULE}True"),
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any], error: type[Exception], message: str) -> None:
    """Each refusal, word for word: a caller reads it to learn what to change."""
    options.setdefault("dim", 8)
    with pytest.raises(error) as refused:
        LSHRS(**options)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "options",
    [
        {"shards": 4096},
        {"num_bands": 255, "rows_per_band": 64},
        {"buckets": 2**31},
        {"signature_cache": 0},
    ],
)
def test_configuration_at_its_bounds_is_accepted(options: dict[str, Any]) -> None:
    """The largest and smallest values each refusal names are allowed (a
    refused one raises here)."""
    LSHRS(dim=8, **options)


async def test_decoding_client_is_refused() -> None:
    from redis.asyncio import Redis

    client = Redis(decode_responses=True)
    with pytest.raises(TypeError, match="decode_responses=False"):
        LSHRS(dim=8, redis=client)
    await client.aclose()


async def test_a_learned_index_refuses_to_train_on_too_few_vectors(make_lsh: Any, raw_redis: Any) -> None:
    lsh = await make_lsh(dim=DIM, store=InMemoryStore(), hashing="kmeans")
    before = await keyspace(raw_redis)
    with pytest.raises(ValueError, match=r"needs at least 256 vectors \(this one has 4\).*hashing='hyperplane'"):
        await lsh.index([1, 2, 3, 4], good)
    assert await keyspace(raw_redis) == before  # no centroids, no records
    assert await lsh.query(good[0]) == []  # an untrained index is an empty one
    first = clustered(256, DIM, seed=3)
    with pytest.raises(ValueError, match=r"this one has 255"):
        await lsh.index(range(255), first[:255])
    await lsh.index(range(256), first)  # a first batch of 256 trains it
    assert (await lsh.query(first[7], top_k=1))[0].id == 7


async def test_a_damaged_projection_refuses_to_open(make_lsh: Any, raw_redis: Any) -> None:
    """A hyperplane index's projection cut short, or gone, would mis-hash every id: refuse."""
    lsh = await make_lsh(dim=DIM, hashing="hyperplane", prefix="damaged-proj")
    await lsh.ingest(1, good[0])
    key = "{damaged-proj}:proj"
    projection = await raw_redis.get(key)
    for damaged in (projection[:-4], None):
        await (raw_redis.delete(key) if damaged is None else raw_redis.set(key, damaged))
        with pytest.raises(ValueError) as refused:
            await make_lsh(dim=DIM, prefix="damaged-proj", hashing=None)
        assert str(refused.value) == "prefix 'damaged-proj' has a damaged projection matrix; drop the index"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda blob: blob[:-2], "stored codebooks have"),
        (lambda blob: blob[:30], "stored centroids have"),
        (lambda blob: b"junk" + blob[4:], "not an lshrs partition"),
        (lambda blob: blob[:4] + (16).to_bytes(4, "little") + blob[8:], "16-d but the index is 32-d"),
        (lambda blob: blob[: len(blob) - 16 - 4 * 32 * 256], "codebooks are missing"),
    ],
    ids=["truncated", "partition truncated", "not a partition", "other dimension", "no codebooks"],
)
async def test_damaged_centroids_refuse_to_open(
    make_lsh: Any, raw_redis: Any, damage: Callable[[bytes], bytes], message: str
) -> None:
    """Centroids that do not fit the configuration would mis-hash every id: refuse."""
    lsh = await make_lsh(dim=DIM, hashing="kmeans", prefix="damaged")
    await lsh.index(range(300), clustered(300, DIM, seed=3))
    key = "{damaged}:cent"
    await raw_redis.set(key, damage(await raw_redis.get(key)))
    with pytest.raises(ValueError, match=message):
        await make_lsh(dim=DIM, prefix="damaged", hashing=None)
