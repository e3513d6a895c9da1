"""What a restarted service meets: the first queries of a fresh client on an
index that is already built (a deploy, a crash, a new worker process).

A fresh client's signature cache is empty, so each query also reads its
candidates' records in the query script until the cache is warm. Three
ways to start, each a new client on the same index, answering the same
queries one at a time:

- ``warm_in_background=False``: the cache fills only from query replies;
- the default: the first query that finds a shard cold warms it in the
  background while the queries go on;
- ``await warm()`` before the first query (the scan timed apart).

    nox -s restart -- --size 100k
    nox -s restart -- --size 1M
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore
from servers import redis_server

from .datasets import load
from .measure import recall
from .report import arguments, finish, save, stem, subplots

#: Queries a block of the latency curve holds.
BLOCK = 50
#: Each start: the client's options, and whether it calls ``warm()`` first.
STARTS: dict[str, tuple[dict[str, Any], bool]] = {
    "no background warm": ({"warm_in_background": False}, False),
    "background warm (default)": ({}, False),
    "warm() first": ({}, True),
}


async def run(size: int, queries: int) -> dict[str, Any]:
    data = load("minilm", size, queries)
    store = InMemoryStore()
    await store.put(np.arange(len(data.base)), data.base)
    dim = data.base.shape[1]
    starts = []
    with redis_server() as server:
        async with LSHRS(dim=dim, redis_url=server.url, store=store) as lsh:
            began = time.perf_counter()
            await lsh.index(np.arange(len(data.base)), data.base)
            build = time.perf_counter() - began
        for name, (options, warm_first) in STARTS.items():
            async with LSHRS(dim=dim, redis_url=server.url, store=store, **options) as lsh:
                began = time.perf_counter()
                if warm_first:
                    await lsh.warm()
                scan = time.perf_counter() - began
                seconds, found = [], []
                for query in data.queries:
                    began = time.perf_counter()
                    hits = await lsh.query(query, top_k=10)
                    seconds.append(time.perf_counter() - began)
                    found.append([hit.id for hit in hits])
            blocks = [float(np.median(seconds[i : i + BLOCK])) for i in range(0, len(seconds), BLOCK)]
            starts.append(
                {
                    "start": name,
                    "warm_seconds": round(scan, 2) if warm_first else None,
                    "block_p50_ms": [round(1000 * b, 2) for b in blocks],
                    "query_seconds": round(sum(seconds), 2),
                    "recall@10": round(recall(found, data.truth, 10), 3),
                }
            )
            print(f"  {name}: {starts[-1]}")
    return {
        "command": "nox -s restart -- " + " ".join(sys.argv[1:]),
        "dataset": data.label,
        "vectors": len(data.base),
        "queries": len(data.queries),
        "build_seconds": round(build, 1),
        "starts": starts,
    }


def table(result: dict[str, Any]) -> str:
    blocks = len(result["starts"][0]["block_p50_ms"])
    lines = [
        f"Command: `{result['command']}`; {result['dataset']}, {result['vectors']:,} vectors, "
        f"`InMemoryStore`; built in {result['build_seconds']} s by one client, then {result['queries']} real "
        f"held-out queries one at a time from each fresh client. p50 ms of each block of {BLOCK} queries, in order:",
        "",
        "| start | `warm()` s | "
        + " | ".join(f"queries {BLOCK * b + 1}-{BLOCK * (b + 1)}" for b in range(blocks))
        + " | all queries s | recall@10 |",
        "|---|---|" + "---|" * blocks + "---|---|",
    ]
    for start in result["starts"]:
        scan = "" if start["warm_seconds"] is None else f"{start['warm_seconds']}"
        p50s = " | ".join(f"{ms}" for ms in start["block_p50_ms"])
        lines.append(f"| {start['start']} | {scan} | {p50s} | {start['query_seconds']} | {start['recall@10']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axis = subplots(figsize=(8, 4))
    for start in result["starts"]:
        blocks = start["block_p50_ms"]
        axis.plot([BLOCK * (b + 1) for b in range(len(blocks))], blocks, marker="o", label=start["start"])
    axis.set_xlabel("queries answered since the client opened")
    axis.set_ylabel(f"p50 ms of the last {BLOCK}")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title(f"lshrs after a restart, {result['vectors']:,} vectors")
    finish(figure, path)


def main() -> None:
    args = arguments(__doc__, size=100_000, queries=300).parse_args()
    save(asyncio.run(run(args.size, args.queries)), stem(args, "restart"), table, plot)


if __name__ == "__main__":
    main()
