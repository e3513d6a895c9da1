"""Random-hyperplane (SimHash) signatures, band keys and query-directed probes.

Pure numpy, no I/O, so the same functions serve the index, the benchmarks and
offline simulations. A signature is the concatenation of the bands; each band
of ``rows`` bits is padded to whole bytes, so a band's bucket key is a plain
byte slice of the signature (the Lua scripts slice it the same way) and the
Hamming distance of two signatures is still the Hamming distance of their bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]

#: How many of a band's least certain bits the prober considers flipping.
_PROBE_BITS = 6


def make_projection(dim: int, num_bits: int, seed: int) -> FloatArray:
    """Gaussian hyperplanes; stored in Redis so every client hashes identically."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((dim, num_bits), dtype=np.float32)


@dataclass(frozen=True)
class Bands:
    """Shape of a signature: ``num_bands`` bands of ``rows`` bits."""

    num_bands: int
    rows: int

    @property
    def band_bytes(self) -> int:
        return (self.rows + 7) // 8

    @property
    def signature_bytes(self) -> int:
        return self.num_bands * self.band_bytes

    @property
    def num_bits(self) -> int:
        return self.num_bands * self.rows

    def pack(self, bits: npt.NDArray[np.bool_]) -> ByteArray:
        """(n, num_bits) booleans -> (n, signature_bytes) packed signatures."""
        n = bits.shape[0]
        padded = np.zeros((n, self.num_bands, self.band_bytes * 8), dtype=np.bool_)
        padded[:, :, : self.rows] = bits.reshape(n, self.num_bands, self.rows)
        return np.packbits(padded, axis=-1).reshape(n, self.signature_bytes)

    def band_keys(self, signature: ByteArray) -> list[bytes]:
        """Bucket suffixes of one signature: band index byte + band value bytes."""
        width = self.band_bytes
        raw = signature.tobytes()
        return [bytes((j,)) + raw[j * width : (j + 1) * width] for j in range(self.num_bands)]


def project(vectors: FloatArray, projection: FloatArray) -> FloatArray:
    """One matrix product for the whole batch; its signs are the signature bits."""
    return vectors @ projection


def hamming(signatures: ByteArray, query: ByteArray) -> npt.NDArray[np.int64]:
    """Bit distance of every row of ``signatures`` to one ``query`` signature."""
    distance: npt.NDArray[np.int64] = np.bitwise_count(signatures ^ query).sum(axis=1, dtype=np.int64)
    return distance


def _flip_masks(rows: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Every subset of a band's few least certain bits, as masks over them."""
    width = min(rows, _PROBE_BITS)
    subsets = [c for k in range(width + 1) for c in combinations(range(width), k)]
    masks = np.zeros((len(subsets), width), dtype=np.bool_)
    for i, subset in enumerate(subsets):
        masks[i, list(subset)] = True
    return masks, np.arange(width)


def probe_keys(bands: Bands, margins: FloatArray, num_probes: int) -> list[bytes]:
    """Bucket suffixes to read for one query: its own bucket in every band, then
    ``num_probes`` more, in the order of least total squared margin of the bits
    flipped, across all bands at once (query-directed multi-probe, Lv et al. 2007).
    """
    by_band = margins.reshape(bands.num_bands, bands.rows)
    bits = by_band > 0
    masks, _ = _flip_masks(bands.rows)
    width = masks.shape[1]
    order = np.argsort(np.abs(by_band), axis=1)[:, :width]  # least certain bits first
    weakest = np.take_along_axis(by_band, order, axis=1) ** 2
    scores = weakest @ masks.T.astype(np.float32)  # (bands, subsets); subset 0 is empty
    total = bands.num_bands + max(0, num_probes)
    flat = np.argsort(scores, axis=None, kind="stable")[: min(total, scores.size)]
    band_ids, subset_ids = np.unravel_index(flat, scores.shape)
    probed = bits[band_ids].copy()
    for i, (band, subset) in enumerate(zip(band_ids, subset_ids)):
        flipped = order[band][masks[subset]]
        probed[i, flipped] = ~probed[i, flipped]
    width_bits = bands.band_bytes * 8
    padded = np.zeros((len(band_ids), width_bits), dtype=np.bool_)
    padded[:, : bands.rows] = probed
    values = np.packbits(padded, axis=1)
    return [bytes((int(band),)) + values[i].tobytes() for i, band in enumerate(band_ids)]
