"""The learned family's product-quantised codes: what they estimate, their
stored form, and the SimHash sketch of indexes built before them."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from conftest import clustered, index_state
from lshrs._codes import ProductCodes, _slices, code_bytes, fit_codes
from lshrs._config import IndexConfig
from lshrs._hashing import make_projection
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio

DIM = 48
BASE = clustered(4000, DIM, centers=40, spread=0.4, seed=11)
UNIT = BASE / np.linalg.norm(BASE, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def codes() -> ProductCodes:
    return fit_codes(UNIT[:3000], 16, seed=1)


def test_codes_estimate_cosines_closely_enough_to_rank_by(codes: ProductCodes) -> None:
    """Scores of held-out queries against every code track the exact cosines,
    and most of the exact top 10 sit among the codes' top 40 (0.905 here,
    as a 256-bit SimHash, twice the bytes, finds 0.900)."""
    encoded = codes.encode(UNIT)
    assert encoded.shape == (4000, 16) and encoded.dtype == np.uint8
    queries = UNIT[3000:3040]
    tables = codes.tables(queries)
    found = 0
    for query, table in zip(queries, tables):
        exact = UNIT @ query
        estimate = codes.scores(encoded, table)
        assert np.abs(estimate - exact).mean() < 0.05
        assert np.corrcoef(estimate, exact)[0, 1] > 0.95
        found += len(set(np.argsort(-exact)[:10]) & set(np.argsort(-estimate)[:40]))
    assert found >= 0.85 * 10 * len(queries)


def test_fitted_codebooks_quantise_better_than_random_rows_and_stay_float32(codes: ProductCodes) -> None:
    """Lloyd iterations move each centroid to its rows' mean: the fitted
    codebooks' mean squared error is 0.56 of 256 random rows' here (0.95 if
    every filled centroid were reseeded, not only the emptied ones). The
    arrays stay float32: a float64 copy would double a client's memory and
    the queries' time, with the same answers."""
    slices = UNIT[:3000].reshape(3000, 16, 3).transpose(1, 0, 2)

    def error(books: np.ndarray) -> float:
        return float(((slices[:, :, None, :] - books[:, None, :, :]) ** 2).sum(axis=-1).min(axis=-1).mean())

    rows = slices[:, np.random.default_rng(5).choice(3000, 256, replace=False)]
    assert error(codes.codebooks) < 0.75 * error(rows)
    assert codes.codebooks.dtype == np.float32 and codes.tables(UNIT[:2]).dtype == np.float32
    assert _slices(UNIT[:2], 16, ones=True).dtype == np.float32


def test_a_code_is_each_slice_s_nearest_centroid(codes: ProductCodes) -> None:
    rows = UNIT[:50]
    encoded = codes.encode(rows)
    slices = rows.reshape(50, 16, 3)
    for j in (0, 7, 15):
        distance = ((slices[:, j, None, :] - codes.codebooks[j][None]) ** 2).sum(axis=2)
        assert np.array_equal(encoded[:, j], np.argmin(distance, axis=1))


def test_codes_pad_a_dimension_that_does_not_divide_and_fit_few_rows() -> None:
    """50-d vectors in 25 bytes (slices of 2; 32 would leave 7 slices of
    padding only), fitted on fewer rows than a slice has centroids; 100-d in
    25 slices of 4, 385-d in 30 of 13, the last one padded."""
    unit = UNIT[:100, :50] if DIM >= 50 else clustered(100, 50, seed=3)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    codes = fit_codes(unit, code_bytes(50), seed=0)
    assert codes.codebooks.shape == (25, 256, 2)
    encoded = codes.encode(unit)
    own = np.array([codes.scores(encoded[i : i + 1], codes.tables(unit[i : i + 1])[0])[0] for i in range(100)])
    assert np.abs(own - 1.0).max() < 0.05  # 100 rows, 256 centroids a slice: nearly exact
    assert [code_bytes(d) for d in (8, 48, 100, 384, 385, 768)] == [8, 24, 25, 32, 30, 32]
    padded = fit_codes(clustered(300, 385, seed=2), code_bytes(385), seed=0)
    assert padded.codebooks.shape == (30, 256, 13) and padded.encode(clustered(5, 385)).shape == (5, 30)


def test_stored_codebooks_round_trip_and_refuse_what_does_not_fit(codes: ProductCodes) -> None:
    blob = codes.to_bytes()
    assert len(blob) == 16 + 4 * 16 * 256 * 3
    again = ProductCodes.from_bytes(blob, DIM, 16)
    assert np.array_equal(again.codebooks, codes.codebooks) and again.codebooks.dtype == np.float32
    assert again.dim == DIM and again.to_bytes() == blob
    with pytest.raises(ValueError, match="code 48-d vectors in 16 bytes, the index 64-d in 16"):
        ProductCodes.from_bytes(blob, 64, 16)
    with pytest.raises(ValueError, match="the index 47-d in 16"):  # slices of 3 either way: the dimension decides
        ProductCodes.from_bytes(blob, 47, 16)
    with pytest.raises(ValueError, match="the index 48-d in 32"):
        ProductCodes.from_bytes(blob, DIM, 32)
    with pytest.raises(ValueError, match="have 49163 bytes, expected 49168"):
        ProductCodes.from_bytes(blob[:-5], DIM, 16)
    with pytest.raises(ValueError, match=r"^the stored codebooks are not lshrs codebooks$"):
        ProductCodes.from_bytes(b"junk" + blob[4:], DIM, 16)
    with pytest.raises(ValueError, match=r"^the stored codebooks are missing or truncated$"):
        ProductCodes.from_bytes(b"", DIM, 16)
    with pytest.raises(ValueError, match="have 16 bytes, expected 49168"):
        ProductCodes.from_bytes(blob[:16], DIM, 16)  # a header and nothing else


async def test_a_learned_index_of_an_earlier_version_keeps_its_simhash(
    make_lsh: Any, raw_redis: Any, shards: int
) -> None:
    """An index stored before codes (512 SimHash bits, no ``code_bytes``)
    opens, trains, writes 68-byte records and answers as before."""
    config = IndexConfig(dim=DIM, num_bands=0, rows_per_band=0, seed=0, shards=shards, hashing="kmeans")
    config = dataclasses.replace(config, sketch_bits=512)
    await raw_redis.set("{legacy}:cfg", config.to_json())
    await raw_redis.set("{legacy}:proj", make_projection(DIM, 512, 0).tobytes())
    lsh = await make_lsh(dim=DIM, prefix="legacy", hashing=None, store=InMemoryStore())
    assert (lsh.config.code_bytes, lsh.config.sketch_bits) == (0, 512)
    await lsh.index(np.arange(1000), BASE[:1000])
    records = await index_state(raw_redis, lsh)  # buckets and records agree
    assert len(records) == 1000 and {len(r) for r in records.values()} == {4 + 64}
    # ...in one record hash a shard, as that version wrote them, not in groups
    record_keys = [key async for key in raw_redis.scan_iter(match="{legacy:*}:s*")]
    assert record_keys and all(key.endswith(b"}:s") for key in record_keys)
    # ...and reranks as deep as a SimHash needs below 50,000 vectors: 512, where codes need 256
    family = (await lsh._ready()).family
    assert family is not None and family.default_rerank(1000) == 512
    hits = await lsh.query(BASE[3], top_k=3)
    assert hits[0].id == 3 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    reader = await make_lsh(dim=DIM, prefix="legacy", hashing=None)  # no store: the SimHash estimate
    assert (await reader.query(BASE[3], top_k=1))[0].score == 1.0


async def test_a_new_learned_index_keeps_codes(make_lsh: Any, raw_redis: Any) -> None:
    lsh = await make_lsh(dim=DIM, prefix="coded", hashing="kmeans")
    assert (lsh.config.code_bytes, lsh.config.sketch_bits) == (24, 0)  # 48-d: 24 slices of 2
    await lsh.index(np.arange(1000), BASE[:1000])
    records = await index_state(raw_redis, lsh)
    # Two bucket numbers (its nearest, then its spill), then the code.
    assert (lsh.config.spill, lsh.config.layout) == (1, 4)
    assert len(records) == 1000 and {len(r) for r in records.values()} == {2 * 4 + 24}
    assert await raw_redis.get("{coded}:proj") == b""  # codes need no projection
    family = (await lsh._ready()).family
    assert family is not None and family.default_rerank(1000) == 256
    # A sum of slices' dot products may stray past +-1: the estimate may not.
    assert family.cosines(np.array([-1.5, -1.0, 0.25, 1.0, 1.5])).tolist() == [1.0, 1.0, -0.25, -1.0, -1.0]


async def test_a_vectors_length_changes_nothing_it_is_indexed_by(make_lsh: Any, raw_redis: Any) -> None:
    """Records hash a vector's direction only: the same vectors at other
    lengths (powers of two, so that normalising them is exact) give the same
    buckets and sketches, trained from them too."""
    lengths = 2.0 ** np.random.default_rng(3).integers(-3, 5, (1000, 1))
    unit = await make_lsh(dim=DIM, prefix="unit", seed=5)
    scaled = await make_lsh(dim=DIM, prefix="scaled", seed=5)
    await unit.index(np.arange(1000), UNIT[:1000])
    await scaled.index(np.arange(1000), (UNIT[:1000] * lengths).astype(np.float32))
    assert await index_state(raw_redis, scaled) == await index_state(raw_redis, unit)
