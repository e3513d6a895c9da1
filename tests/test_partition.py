"""The partition's stored form: int8 rows with a scale each, and the float16
blobs earlier versions stored, read alike (issue 12: the partition was a
quarter of the index's memory)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import clustered
from lshrs._partition import Partition, fit

DIM = 48
UNIT = clustered(4000, DIM, centers=40, seed=11)


@pytest.fixture(scope="module")
def fitted() -> Partition:
    return fit(UNIT, 250, seed=1, trained_for=4000)


def test_a_stored_partition_is_int8_and_assigns_as_fitted(fitted: Partition) -> None:
    blob = fitted.to_bytes()
    rows = len(fitted.coarse) + fitted.buckets
    assert len(blob) == 20 + 4 * (len(fitted.coarse) + 1) + rows * (4 + DIM)  # a scale and DIM bytes a row
    stored = Partition.from_bytes(blob, DIM)
    assert stored.trained_for == 4000
    assert np.array_equal(stored.starts, fitted.starts)
    assert np.abs(stored.fine - fitted.fine).max() <= np.abs(fitted.fine).max() / 127
    # Rounding only breaks near-ties: an id's stored bucket scores, under the
    # fitted centroids, within a rounding error of its fitted bucket.
    fitted_scores = UNIT @ fitted.fine.T
    rows = np.arange(len(UNIT))
    lost = fitted_scores[rows, fitted.assign(UNIT)] - fitted_scores[rows, stored.assign(UNIT)]
    assert lost.max() <= 0.005


def test_a_float16_partition_of_an_earlier_version_still_opens(fitted: Partition) -> None:
    """The "LSK1" layout, written here byte by byte as the earlier version did."""
    header = np.array([0x4C534B31, DIM, len(fitted.coarse), fitted.buckets, 4000], "<u4").tobytes()
    blob = (
        header
        + fitted.starts.astype("<u4").tobytes()
        + fitted.coarse.astype("<f2").tobytes()
        + fitted.fine.astype("<f2").tobytes()
    )
    old = Partition.from_bytes(blob, DIM)
    assert np.array_equal(old.fine, fitted.fine.astype(np.float16).astype(np.float32))
    assert (old.assign(UNIT) == fitted.assign(UNIT)).mean() >= 0.99
    with pytest.raises(ValueError, match="expected"):
        Partition.from_bytes(blob[:-1], DIM)
