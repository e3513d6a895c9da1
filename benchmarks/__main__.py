"""Run the benchmarks: ``python -m benchmarks --size 100k`` (or ``nox -s bench -- --size 100k``).

Starts its own redis-server and PostgreSQL (with pgvector) on loopback, measures
lshrs and the baselines on the same vectors in one run, and writes
``results/<run>.json``, ``results/<run>.png`` (recall@10 against QPS) and
``results/<run>.md`` (the table the README shows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import postgres, redis_server

from . import redisearch, stores, systems
from .datasets import load, parse_size
from .report import write
from .scale import scale_run

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    started = time.time()
    print(f"loading {args.dataset} at {size:,} vectors ...")
    data = load(args.dataset, size, args.queries)
    print(f"  {data.label}; {len(data.queries)} real held-out queries; exact top-100 by brute force")
    result: dict[str, Any] = {
        "command": " ".join(["nox -s bench --", *sys.argv[1:]]),
        "machine": machine(),
        "dataset": data.label,
        "generated": data.generated,
        "size": size,
        "queries": len(data.queries),
        "points": [],
        "builds": [],
    }
    with redis_server("--appendonly", "no") as redis, postgres() as pg:
        url, dsn = redis.url, pg.url
        result["points"].append(systems.numpy_exact(data, args.queries))
        structures = [(b, r) for b in (args.bands or [None]) for r in (args.rows or [None])]
        points, builds = await systems.lshrs_runs(
            data,
            url,
            structures,
            args.probes,
            args.rerank,
            args.queries,
            hyperplanes="hyperplane" not in args.skip,
            processes=args.processes,
        )
        result["points"] += points
        result["builds"] += [{"system": "lshrs", **b} for b in builds]
        if "faiss" not in args.skip:
            points, builds = systems.faiss_runs(data, args.queries)
            result["points"] += points
            result["builds"] += builds
        if "pgvector" not in args.skip:
            points, builds = await systems.pgvector_runs(data, dsn, args.queries)
            result["points"] += points
            result["builds"] += builds
        if "redisearch" not in args.skip:
            points, builds = await redisearch.redisearch_runs(data, args.queries)
            result["points"] += points
            result["builds"] += builds
        if "stores" not in args.skip:
            prefix = "bench-kmeans-None"  # the learned index lshrs_runs built: the default family
            rows = min(size, args.store_rows)
            # Its default probes, given: tune(0.95) saved its probes beside the
            # index, and a client opened without probes= would use those.
            probes = next(b["default_probes"] for b in result["builds"] if b.get("hashing") == "kmeans")
            result["stores"] = await stores.compare(data, url, dsn, prefix, rows, min(args.queries, 200), probes)
    result["seconds"] = round(time.time() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100k", help="vectors: up to 100k real, beyond that GENERATED (e.g. 1M)")
    parser.add_argument("--dataset", choices=["minilm", "glove"], default="minilm")
    parser.add_argument("--queries", type=int, default=500, help="held-out real queries to run (at most 1000)")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="client processes that also serve lshrs's default and tuned settings (1: none)",
    )
    parser.add_argument("--bands", type=int, nargs="*", help="band counts to build (default: lshrs's own choice)")
    parser.add_argument("--rows", type=int, nargs="*", help="rows per band to build (default: lshrs's own choice)")
    parser.add_argument(
        "--probes",
        type=float,
        nargs="*",
        default=[8.0, 16.0, 32.0],
        help="buckets read per query: multiples of bands (hyperplane) or sixteenths of the default (kmeans); "
        "the default and tune(0.95)'s choice are always added",
    )
    parser.add_argument(
        "--rerank", type=int, nargs="*", default=[0], help="candidates reranked exactly (0: lshrs's default)"
    )
    peers = ["faiss", "pgvector", "redisearch", "stores", "hyperplane"]
    parser.add_argument("--skip", nargs="*", default=[], choices=peers)
    parser.add_argument("--store-rows", type=int, default=100_000, help="rows per store table in the store comparison")
    parser.add_argument(
        "--scale",
        metavar="SIZE",
        help="lshrs alone at a GENERATED SIZE (e.g. 6.4M): streamed build, then recall, share and speed",
    )
    parser.add_argument("--name", help="name of the result files (default: from the arguments)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.scale:
        with redis_server("--appendonly", "no") as redis:
            result = asyncio.run(scale_run(redis.url, parse_size(args.scale), args.queries))
        result["machine"] = machine()
        result["command"] = " ".join(["nox -s bench --", *sys.argv[1:]])
        name = args.name or f"scale-{args.scale}"
        write(result, RESULTS / name)
        print(f"\nwrote {RESULTS / name}.json, .md and .png")
        return
    result = asyncio.run(run(args))
    name = args.name or f"{args.dataset}-{args.size}"
    write(result, RESULTS / name)
    print(f"\nwrote {RESULTS / name}.json, .md and .png in {result['seconds']} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
