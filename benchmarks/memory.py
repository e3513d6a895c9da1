"""What the index costs in Redis, byte by byte a vector, and how long the
default learned build takes from memory (issue 12).

Builds the default learned index of ``--size`` vectors (real, then GENERATED
past 100k) on a fresh Redis, then reads ``MEMORY USAGE`` (every nested value
counted) of every key under its prefix, grouped by what the key holds, beside
the bytes of data it holds: the rest is Redis's own overhead (key and hash
entries, allocator rounding). The build ends by rewriting each bucket at its
exact size, so the buckets hold no room to grow.

    nox -s memory -- --size 100k
    nox -s memory -- --size 1M
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from servers import redis_server

from .datasets import load
from .report import arguments, finish, save, stem, subplots

PREFIX = "mem"
#: Key suffix -> what the key holds.
KINDS = {
    "s": "id records (hashes of about 32: id -> bucket numbers + 32-byte code)",
    "b": "buckets (strings of ids)",
    "l": "change log (last 4,096 written ids a shard)",
    "g": "change generation counters",
    "n": "id counts",
    "cent": "partition (int8 centroids) and codebooks",
    "proj": "projection (float32; empty: codes need none)",
    "cfg": "configuration",
    "tune": "tuning",
}
_BATCH = 1000


def kind_of(key: bytes) -> str:
    suffix = key.split(b"}:", 1)[1]
    return suffix[:1].decode() if suffix[:1] in (b"b", b"s") else suffix.decode()


async def breakdown(client: Redis, record_bytes: int, id_bytes: int) -> dict[str, dict[str, int]]:
    """Per kind of key: how many, their MEMORY USAGE and the data they hold."""
    keys = [key async for key in client.scan_iter(match=f"{{{PREFIX}*", count=5000)]
    out: dict[str, dict[str, int]] = {}
    for start in range(0, len(keys), _BATCH):
        chunk = keys[start : start + _BATCH]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
            pipe.type(key)
        replies = await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for key, kind in zip(chunk, replies[1::2]):
            {b"string": pipe.strlen, b"hash": pipe.hlen, b"list": pipe.llen}[kind](key)
        sizes = await pipe.execute()
        for key, used, kind, size in zip(chunk, replies[0::2], replies[1::2], sizes):
            row = out.setdefault(kind_of(key), {"keys": 0, "memory": 0, "data": 0})
            row["keys"] += 1
            row["memory"] += int(used)
            # A hash holds stored ids and their records; the change log, ids of 8 bytes.
            row["data"] += int(size) * {b"string": 1, b"hash": id_bytes + record_bytes, b"list": 8}[kind]
    return out


async def run(size: int, id_bytes: int | None = None) -> dict[str, Any]:
    data = load("minilm", size, 0)
    with redis_server() as server:
        client = Redis.from_url(server.url)
        before = int((await client.info("memory"))["used_memory"])
        lsh = LSHRS(dim=data.base.shape[1], redis_url=server.url, prefix=PREFIX, id_bytes=id_bytes)
        started = time.perf_counter()
        await lsh.index(np.arange(len(data.base)), data.base)
        build = time.perf_counter() - started
        after = int((await client.info("memory"))["used_memory"])
        record_bytes = 4 * (1 + lsh.config.spill) + (lsh.config.code_bytes or lsh.config.sketch_bits // 8)
        started = time.perf_counter()
        stats = await lsh.stats()
        sampled = time.perf_counter() - started
        started = time.perf_counter()
        await lsh.stats(exact=True)
        exact = time.perf_counter() - started
        id_bytes = lsh.config.id_bytes
        rows = await breakdown(client, record_bytes, id_bytes)
        await lsh.close()
        await client.aclose()
    return {
        "command": "python -m benchmarks.memory " + " ".join(sys.argv[1:]),
        "dataset": data.name,
        "vectors": len(data.base),
        "buckets": stats["partition_buckets"],
        "id_bytes": id_bytes,
        "build_seconds": round(build, 1),
        "stats_seconds": {"sampled": round(sampled, 3), "exact": round(exact, 3)},
        "used_memory_growth": after - before,
        "kinds": rows,
    }


def table(result: dict[str, Any]) -> str:
    n = result["vectors"]
    lines = [
        f"Command: `{result['command']}`; {result['dataset']}, {n:,} vectors, {result['buckets']:,} buckets, "
        f"{result.get('id_bytes', 8)}-byte ids; "
        f"build from memory {result['build_seconds']} s; Redis `used_memory` grew "
        f"{result['used_memory_growth'] / n:.1f} B a vector. `stats()` took {result['stats_seconds']['sampled']} s "
        f"(sampled buckets), `stats(exact=True)` {result['stats_seconds']['exact']} s (every bucket).",
        "",
        "| what | keys | B/vector in Redis | of which data | of which overhead |",
        "|---|---|---|---|---|",
    ]
    total = 0
    for kind, row in sorted(result["kinds"].items(), key=lambda item: -item[1]["memory"]):
        name = KINDS.get(kind, kind)
        total += row["memory"]
        lines.append(
            f"| {name} | {row['keys']:,} | {row['memory'] / n:.1f} | {row['data'] / n:.1f} | "
            f"{(row['memory'] - row['data']) / n:.1f} |"
        )
    lines.append(f"| **total** | | **{total / n:.1f}** | | |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    n = result["vectors"]
    kinds = sorted(result["kinds"], key=lambda k: -result["kinds"][k]["memory"])
    data = [result["kinds"][k]["data"] / n for k in kinds]
    overhead = [(result["kinds"][k]["memory"] - result["kinds"][k]["data"]) / n for k in kinds]
    figure, axis = subplots(figsize=(8, 4))
    axis.barh(kinds, data, label="data")
    axis.barh(kinds, overhead, left=data, label="Redis overhead")
    axis.set_xlabel("bytes a vector")
    axis.invert_yaxis()
    axis.legend()
    axis.set_title(f"lshrs index memory, {n:,} vectors")
    finish(figure, path)


def main() -> None:
    parser = arguments(__doc__, size=100_000)
    parser.add_argument("--id-bytes", type=int, choices=(4, 8), default=None, help="default: the library's (4)")
    args = parser.parse_args()
    save(asyncio.run(run(args.size, args.id_bytes)), stem(args, "memory"), table, plot)


if __name__ == "__main__":
    main()
