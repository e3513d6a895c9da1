"""Random-hyperplane (SimHash) signatures, band keys and query-directed probes.

Pure numpy, no I/O, so the same functions serve the index, the benchmarks and
offline simulations. A signature is the concatenation of the bands; each band
of ``rows`` bits is padded to whole bytes, so a band's bucket key is a plain
byte slice of the signature (the Lua scripts slice it the same way) and the
Hamming distance of two signatures is still the Hamming distance of their bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]

#: How many of a band's least certain bits the prober considers flipping.
_PROBE_BITS = 8

#: c / sqrt(1 - c^2) for the cosine c of the neighbours the prober looks for:
#: 0.5, where real sentence embeddings keep their nearest neighbours.
_NEIGHBOUR_ODDS = 0.5 / math.sqrt(1 - 0.5**2)

#: Margins past this many standard deviations are certain enough; the cost
#: tables stop here.
_MAX_Z = 8.0


def make_projection(dim: int, num_bits: int, seed: int) -> FloatArray:
    """Gaussian hyperplanes; stored in Redis so every client hashes identically."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((dim, num_bits), dtype=np.float32)


def standardise(projection: FloatArray) -> FloatArray:
    """Columns rescaled to length sqrt(dim): the signs (the signature) are the
    same, and a unit vector's projections become standard normal scores, which
    is the scale :func:`probe_keys` reasons in."""
    scale = np.sqrt(projection.shape[0]) / np.linalg.norm(projection, axis=0)
    standard: FloatArray = (projection * scale).astype(np.float32)
    return standard


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


def project(vectors: FloatArray, projection: FloatArray) -> FloatArray:
    """One matrix product for the whole batch; its signs are the signature bits."""
    return vectors @ projection


def hamming(signatures: ByteArray, query: ByteArray) -> npt.NDArray[np.int64]:
    """Bit distance of every row of ``signatures`` to one ``query`` signature.

    Read as the widest words the signature length divides into: counting
    bits of 64-bit words is about 4x faster than of bytes (measured 0.5 ms
    against 1.9 ms for 15,000 candidates of 96 bytes), and a warm query
    ranks that many."""
    width = signatures.shape[1]
    word = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if width % np.dtype(w).itemsize == 0)
    rows = np.ascontiguousarray(signatures).view(word)
    distance: npt.NDArray[np.int64] = np.bitwise_count(rows ^ np.ascontiguousarray(query).view(word)).sum(
        axis=1, dtype=np.int64
    )
    return distance


def _log_cdf_table() -> tuple[FloatArray, FloatArray]:  # pragma: no mutate block (runs at import)
    """On a grid of z: the log-odds against a bit flipping, log Phi(z) - log
    Phi(-z), and the cost of it not flipping, -log Phi(z). Numpy has no erfc,
    and a table is exact enough."""
    grid = np.linspace(0.0, _MAX_Z, 2049)
    log_odds = [math.log(math.erfc(-a / math.sqrt(2))) - math.log(math.erfc(a / math.sqrt(2))) for a in grid]
    log_keep = [-math.log(0.5 * math.erfc(-a / math.sqrt(2))) for a in grid]
    return grid.astype(np.float32), np.array([log_odds, log_keep], dtype=np.float32)


_GRID, _COSTS = _log_cdf_table()


def _subset_masks(width: int) -> npt.NDArray[np.float32]:  # pragma: no mutate block (runs at import)
    """Row s flips the bits named by the binary digits of s: every subset once."""
    return ((np.arange(1 << width)[:, None] >> np.arange(width)) & 1).astype(np.float32)


_MASKS = [_subset_masks(w) for w in range(_PROBE_BITS + 1)]


def probe_keys(bands: Bands, margins: FloatArray, num_probes: int) -> bytes:
    """The ``num_probes`` buckets most likely to hold the query's neighbours,
    across all bands, as one string of fixed-width bucket suffixes.

    ``margins`` are the query's standardised projections (:func:`standardise`).
    A neighbour at cosine c lands on the other side of hyperplane i with
    probability Phi(-z_i), z_i = c / sqrt(1 - c^2) * |margin_i|,
    so a bucket (a band with some of its bits flipped) holds it with a
    probability whose log is a sum over the band's bits. Buckets are read in
    that order: an uncertain band's own bucket may rank below a flip in a
    confident band (query-directed multi-probe, Lv et al. 2007, with the exact
    likelihood instead of squared margins, which fits the small margins of
    sentence embeddings much better).
    """
    rows, width_bits = bands.rows, bands.band_bytes * 8
    z = np.minimum(np.abs(margins.reshape(bands.num_bands, rows)) * _NEIGHBOUR_ODDS, _MAX_Z)
    flip_cost = np.interp(z, _GRID, _COSTS[0])  # log-odds against flipping each bit
    keep_cost = np.interp(z, _GRID, _COSTS[1]).sum(axis=1)  # -log P(band unchanged)
    width = min(rows, _PROBE_BITS)
    weakest = np.argsort(flip_cost, axis=1, kind="stable")[:, :width]
    masks = _MASKS[width]
    scores = keep_cost[:, None] + np.take_along_axis(flip_cost, weakest, axis=1) @ masks.T  # (bands, subsets)
    count = min(max(num_probes, 1), scores.size)
    flat = np.argpartition(scores, count - 1, axis=None)[:count] if count < scores.size else np.arange(scores.size)
    flat = flat[np.argsort(scores.ravel()[flat], kind="stable")]
    band_ids, subset_ids = np.divmod(flat, scores.shape[1])
    # A band's value is its bits packed big-endian into whole bytes: bit i of the
    # band is worth 1 << (width_bits - 1 - i).
    weights = np.left_shift(1, width_bits - 1 - np.arange(rows, dtype=np.int64))
    own = (margins.reshape(bands.num_bands, rows) > 0).astype(np.int64) @ weights
    flips = masks.astype(np.int64) @ weights[weakest].T  # (subsets, bands)
    values = own[band_ids] ^ flips[subset_ids, band_ids]
    shifts = 8 * np.arange(bands.band_bytes - 1, -1, -1)
    keys = np.empty((count, 1 + bands.band_bytes), np.uint8)
    keys[:, 0] = band_ids
    keys[:, 1:] = (values[:, None] >> shifts) & 0xFF
    return keys.tobytes()
