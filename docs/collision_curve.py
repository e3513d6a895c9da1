"""Draws collision.png: the chance that a vector at a given cosine to the query
shares a bucket with it, for lshrs's default band shapes. ``python docs/collision_curve.py``"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lshrs import collision_probability
from lshrs._config import choose_bands, choose_rows

cosines = np.linspace(0.0, 1.0, 201)
figure, axes = plt.subplots(figsize=(7, 4))
for size in (10_000, 100_000, 1_000_000, 6_400_000):
    rows = choose_rows(size)
    bands = choose_bands(0.6, rows)
    curve = [collision_probability(c, rows, bands) for c in cosines]
    axes.plot(cosines, curve, label=f"{size:,} vectors: {bands} bands x {rows} rows")
axes.axvspan(0.4, 0.6, color="grey", alpha=0.15, label="typical sentence-embedding neighbours")
axes.set_xlabel("cosine similarity to the query")
axes.set_ylabel("P(shares at least one exact bucket)")
axes.set_title("Random-hyperplane LSH, exact buckets only (multi-probe adds to this)")
axes.grid(alpha=0.3)
axes.legend(fontsize=8, loc="upper left")
figure.tight_layout()
figure.savefig(Path(__file__).with_name("collision.png"), dpi=110)
