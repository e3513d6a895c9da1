"""Benchmark vectors: the real sets in ../shared/data, and a labelled generator
for sizes beyond them. Ground truth is always exact brute-force cosine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("LSHRS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass
class Dataset:
    name: str
    base: np.ndarray  # (n, d) float32, unit rows
    queries: np.ndarray  # (q, d) float32, unit rows
    truth: np.ndarray  # (q, 100) ids of the exact top-100, best first
    texts: list[str] | None
    generated: bool

    @property
    def label(self) -> str:
        kind = "GENERATED from" if self.generated else "real"
        return f"{self.name} ({kind} {'minilm' if 'minilm' in self.name else 'glove'} embeddings, n={len(self.base):,})"


def size_label(size: int) -> str:
    """How a run's file names write its size: 100k, 1M, 6.4M."""
    return f"{size / 1_000_000:g}M" if size >= 1_000_000 else f"{size // 1000}k"


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def exact_top(base: np.ndarray, queries: np.ndarray, k: int = 100) -> np.ndarray:
    """Exact cosine top-k by blocks of the base (base rows are unit length)."""
    best_ids = np.empty((len(queries), 0), np.int64)
    best_scores = np.empty((len(queries), 0), np.float32)
    for start in range(0, len(base), 200_000):
        scores = queries @ base[start : start + 200_000].T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k] + start
        best_ids = np.concatenate([best_ids, ids], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, ids - start, axis=1)], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_ids = np.take_along_axis(best_ids, order, axis=1)
        best_scores = np.take_along_axis(best_scores, order, axis=1)
    return best_ids


def _real(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    folder = SHARED / name
    if not folder.exists():
        raise SystemExit(f"benchmark data not found at {folder}: set LSHRS_SHARED_DATA")
    base_file = folder / ("base.f16.npy" if (folder / "base.f16.npy").exists() else "base.npy")
    base = np.load(base_file).astype(np.float32)
    texts = (folder / "base_texts.txt").read_text().splitlines()
    return base, np.load(folder / "queries.npy").astype(np.float32), texts


def generate(real: np.ndarray, n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Rows ``start..start+n`` of a corpus GENERATED from a real one: each vector
    mixes two real vectors and Gaussian noise, so neighbourhoods stay about as
    spread as in the real data. Deterministic per row block, so it can stream."""
    rng = np.random.default_rng([seed, start])
    first = real[rng.integers(0, len(real), n)]
    second = real[rng.integers(0, len(real), n)]
    noise = rng.standard_normal(first.shape, dtype=np.float32) / np.sqrt(real.shape[1])
    mixed = first + 0.5 * second + 0.35 * noise
    return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)


def load(name: str, size: int, queries: int) -> Dataset:
    folder = {"minilm": "minilm-100k", "glove": "glove50-100k"}[name]
    base, query_vectors, texts = _real(folder)
    query_vectors = query_vectors[:queries]
    if size <= len(base):
        if size == len(base):
            truth = np.load(SHARED / folder / "gt.npy")[:queries].astype(np.int64)
        else:
            truth = exact_top(base[:size], query_vectors)
        return Dataset(
            folder if size == len(base) else f"{folder}[:{size}]",
            base[:size],
            query_vectors,
            truth,
            texts[:size],
            generated=False,
        )
    generated = np.concatenate(
        [base] + [generate(base, min(500_000, size - s), start=s) for s in range(len(base), size, 500_000)]
    )
    return Dataset(
        f"{name}-generated-{size}", generated, query_vectors, exact_top(generated, query_vectors), None, generated=True
    )
