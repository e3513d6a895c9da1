"""Recall on real sentence embeddings, the likelihood-ordered prober, and tune()."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from redis.asyncio import Redis

from conftest import brute_force, clustered, planned_probes
from lshrs import LSHRS, Tuning
from lshrs._config import choose_rows
from lshrs._family import HyperplaneFamily
from lshrs._hashing import Bands, hamming, make_projection, probe_keys, standardise
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio

#: 10,000 real all-MiniLM-L6-v2 sentence embeddings and 40 held-out queries,
#: shipped with the demo (attribution in its README).
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def real_corpus() -> tuple[np.ndarray, np.ndarray]:
    corpus = np.load(DATA / "corpus.f16.npy").astype(np.float32)
    queries = np.load(DATA / "queries.f16.npy").astype(np.float32)
    return corpus, queries


def mean_recall(results: list[list[Any]], truth: np.ndarray) -> float:
    return float(
        np.mean([len({h.id for h in hits} & set(row.tolist())) / truth.shape[1] for hits, row in zip(results, truth)])
    )


#: Real embeddings with exact ground truth, beside the checkout (CI has them too).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: recall@10 with defaults, measured on this machine (tests/README.md): each
#: threshold sits 0.02 under it, and 300 queries keep the noise below that.
MEASURED: dict[tuple[str, int, str, str], float | None] = {
    ("minilm-100k", 20_000, "kmeans", "redis"): 0.9737,
    ("minilm-100k", 50_000, "kmeans", "redis"): 0.9700,
    ("minilm-100k", 20_000, "kmeans-unspilled", "redis"): 0.9623,
    ("minilm-100k", 20_000, "hyperplane", "redis"): 0.9367,
    ("glove50-100k", 20_000, "kmeans", "redis"): 0.9913,
    ("glove50-100k", 20_000, "hyperplane", "redis"): 0.9860,
    ("minilm-100k", 20_000, "kmeans", "cluster"): 0.9737,
    ("minilm-100k", 20_000, "hyperplane", "cluster"): 0.9367,
}


def shared_slice(name: str, size: int, queries: int = 300) -> tuple[np.ndarray, np.ndarray]:
    folder = SHARED / name
    base_file = folder / ("base.f16.npy" if (folder / "base.f16.npy").exists() else "base.npy")
    if not base_file.exists():
        pytest.skip(f"{base_file} is not here: the shared data sits beside the checkout")
    base = np.load(base_file, mmap_mode="r")[:size].astype(np.float32)
    return base, np.load(folder / "queries.npy")[:queries].astype(np.float32)


@pytest.mark.parametrize(("data", "size", "hashing", "where"), list(MEASURED))
async def test_recall_with_defaults_on_real_embeddings(
    request: pytest.FixtureRequest, data: str, size: int, hashing: str, where: str
) -> None:
    """Defaults sized from the data, nothing tuned, held-out real queries:
    recall@10 against exact brute force stays within 0.02 of what it measured
    (on a cluster, with the ids over 3 shards)."""
    base, queries = shared_slice(data, size)
    truth = brute_force(base, queries, 10)
    options: dict[str, Any] = {"hashing": hashing.removesuffix("-unspilled")}
    if hashing == "kmeans-unspilled":
        options["spill"] = 0
    if where == "redis":
        proc = request.getfixturevalue("redis_proc")
        url = f"redis://{proc.host}:{proc.port}/0"
    else:
        url = f"redis://127.0.0.1:{request.getfixturevalue('cluster_ports')[0]}/0"
        options["shards"] = 3
    if hashing == "hyperplane":
        options["expected_size"] = size
    async with LSHRS(
        dim=base.shape[1], redis_url=url, prefix=f"real-{data}-{size}-{hashing}", store=InMemoryStore(), **options
    ) as lsh:
        await lsh.index(np.arange(len(base)), base)
        recall = mean_recall(await lsh.query_many(queries, top_k=10), truth)
        await lsh.drop()
    measured = MEASURED[(data, size, hashing, where)]
    assert measured is not None and recall >= measured - 0.02, (recall, measured)


def test_prober_reads_the_most_likely_buckets_first() -> None:
    """The buckets of a query's true neighbours come early in the probe order:
    the first quarter of the probes catches more of them than the second, the
    second more than the last, and
    every bucket is named once."""
    corpus, queries = real_corpus()
    truth = brute_force(corpus, queries, 10)
    bands = Bands(16, 12)
    projection = standardise(make_projection(384, bands.num_bits, 0))
    corpus_keys = bands.pack(corpus @ projection > 0).reshape(len(corpus), bands.num_bands, bands.band_bytes)
    per_quarter = np.zeros(4, np.int64)
    for query, neighbours in zip(queries, truth):
        margins = (query @ projection) / np.linalg.norm(query)
        keys = np.frombuffer(probe_keys(bands, margins, 512), np.uint8).reshape(-1, 1 + bands.band_bytes)
        assert len({k.tobytes() for k in keys}) == len(keys) == 512
        for order, key in enumerate(keys):
            per_quarter[order // 128] += (corpus_keys[neighbours, key[0]] == key[1:]).all(axis=1).sum()
    assert per_quarter[0] > per_quarter[1] > per_quarter[3], per_quarter
    assert per_quarter[0] > 2 * per_quarter[3], per_quarter


@pytest.mark.parametrize("rows", [8, 12, 16, 17, 20, 63, 64])
def test_probe_keys_name_the_buckets_the_signature_names(rows: int) -> None:
    """Whatever the band width (1 to 8 bytes), each band's unflipped probe is
    exactly the bucket suffix that ``Bands.pack`` gives the query itself."""
    bands = Bands(4, rows)
    margins = np.random.default_rng(rows).standard_normal(bands.num_bits).astype(np.float32)
    margins[::5] = 0.0  # on a hyperplane: the signature's bit is 0 (``> 0``), so must the probe's be
    keys = np.frombuffer(probe_keys(bands, margins, 1000), np.uint8).reshape(-1, 1 + bands.band_bytes)
    named = {(int(k[0]), k[1:].tobytes()) for k in keys}
    assert len(named) == len(keys)
    own = bands.pack((margins > 0)[None])[0].reshape(bands.num_bands, bands.band_bytes)
    assert all((band, own[band].tobytes()) in named for band in range(bands.num_bands))


@pytest.mark.parametrize("width", [1, 3, 4, 6, 8, 12, 96, 100, 144])
def test_hamming_counts_differing_bits_at_every_signature_width(width: int) -> None:
    """Signatures are counted in the widest words their length divides into;
    the distance must be the bit count whatever that word is."""
    rng = np.random.default_rng(width)
    signatures = rng.integers(0, 256, (50, width), dtype=np.uint8)
    query = signatures[7].copy()
    query[width - 1] ^= 0b101  # two bits off row 7
    expected = np.unpackbits(signatures ^ query, axis=1).sum(axis=1)
    assert hamming(signatures, query).tolist() == expected.tolist()
    assert hamming(signatures, query)[7] == 2


@pytest.mark.parametrize(
    ("num_bands", "rows", "asked"),
    [(3, 4, 1), (3, 4, 2), (3, 4, 7), (3, 4, 20), (3, 4, 48), (16, 8, 1), (16, 8, 100), (16, 8, 700)],
)
def test_probe_keys_are_the_likeliest_buckets_in_order(num_bands: int, rows: int, asked: int) -> None:
    """Against a brute force over every bucket of every band: a neighbour at
    cosine 0.5 lands on the far side of hyperplane i with probability
    Phi(-z_i), z_i = 0.5 / sqrt(0.75) * |margin_i|; the probes are the
    buckets it most likely lands in, likeliest first."""
    assert_likeliest_in_order(Bands(num_bands, rows), asked, 5)


def test_probe_keys_take_the_likeliest_at_every_count() -> None:
    """The same, for every count of probes over many margins: a selection one
    rank off is right for most of them."""
    for seed in range(30):
        for asked in range(1, 49):
            assert_likeliest_in_order(Bands(3, 4), asked, seed)


def assert_likeliest_in_order(bands: Bands, asked: int, seed: int) -> None:
    num_bands, rows = bands.num_bands, bands.rows
    margins = np.random.default_rng(seed).standard_normal(bands.num_bits).astype(np.float32)
    z = np.abs(margins.reshape(num_bands, rows)) * 0.5 / math.sqrt(0.75)
    log_flip = np.log(0.5 * np.vectorize(math.erfc)(z / math.sqrt(2)))  # log Phi(-z)
    log_keep = np.log(0.5 * np.vectorize(math.erfc)(-z / math.sqrt(2)))  # log Phi(z)
    own = margins.reshape(num_bands, rows) > 0
    subsets = ((np.arange(1 << rows)[:, None] >> np.arange(rows)) & 1).astype(bool)  # every set of bits to flip
    weights = 1 << np.arange(8 * bands.band_bytes - 1, 8 * bands.band_bytes - 1 - rows, -1)  # big-endian bits
    likely = []
    for band in range(num_bands):
        costs = -np.where(subsets, log_flip[band], log_keep[band]).sum(axis=1)
        values = ((own[band] ^ subsets) * weights).sum(axis=1)
        likely += [(float(c), band, int(v)) for c, v in zip(costs, values)]
    likely.sort()
    keys = np.frombuffer(probe_keys(bands, margins, asked), np.uint8).reshape(-1, 2)
    assert [(int(b), int(v)) for b, v in keys] == [(band, value) for _, band, value in likely[:asked]]


def test_standardised_columns_have_length_sqrt_dim() -> None:
    """Margins are read as standard normal scores (:func:`probe_keys`)."""
    projection = make_projection(40, 24, 3)
    assert np.array_equal(make_projection(40, 24, 3), projection)  # the seed decides it
    assert not np.array_equal(make_projection(40, 24, 4), projection)
    standard = standardise(projection)
    np.testing.assert_allclose(np.linalg.norm(standard, axis=0), math.sqrt(40), rtol=1e-5)
    assert ((standard > 0) == (projection > 0)).all()


def test_prober_caps_at_every_nameable_bucket() -> None:
    bands = Bands(3, 4)
    margins = np.random.default_rng(0).standard_normal(bands.num_bits).astype(np.float32)
    keys = np.frombuffer(probe_keys(bands, margins, 10_000), np.uint8).reshape(-1, 2)
    assert len(keys) == 3 * 16
    assert len({k.tobytes() for k in keys}) == 48


def test_default_shapes() -> None:
    assert [choose_rows(n) for n in (10_000, 100_000, 1_000_000, 6_400_000)] == [8, 12, 15, 18]

    def probes(bands: int, rows: int) -> int:
        return HyperplaneFamily(Bands(bands, rows), make_projection(8, bands * rows, 0)).default_probes()

    assert probes(48, 14) > probes(48, 10) > probes(24, 10)
    # bands * 2**((rows - 6) / 2): the default the benchmarks report for 48 x 12.
    assert [probes(48, 12), probes(48, 6), probes(16, 10), probes(24, 9)] == [384, 48, 64, 68]


def test_a_sketch_bit_is_the_side_of_its_hyperplane() -> None:
    """A vector and its opposite lie on opposite sides of every hyperplane:
    their sketches differ in every bit (a threshold off zero breaks that)."""
    from lshrs._family import LearnedFamily
    from lshrs._partition import fit

    vectors = clustered(400, 32, seed=6)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    family = LearnedFamily(fit(unit, 16, seed=0, trained_for=400), make_projection(32, 512, 1))
    ahead, behind = family.records(vectors), family.records(-vectors)
    query = family.sketches(unit[:1])[0]
    assert (family.distances(behind, query)[0], family.distances(ahead, query)[0]) == (512, 0)
    sketch = np.unpackbits(ahead[:, 4:], axis=1).astype(bool)
    assert (sketch == (vectors @ make_projection(32, 512, 1) > 0)).all()


async def test_tune_reaches_the_target_and_is_saved(make_lsh: Any) -> None:
    base = clustered(3000, 32, seed=2, spread=0.4)
    lsh = await make_lsh(store=InMemoryStore(), num_bands=16, rows_per_band=10)
    await lsh.index(np.arange(len(base)), base)
    tuning = await lsh.tune(0.9, sample=60)
    assert isinstance(tuning, Tuning)
    assert tuning.recall >= 0.9, tuning
    assert tuning.probes == tuning.curve[-1].probes
    assert all(point.recall < 0.9 for point in tuning.curve[:-1])  # the fewest probes that reach it
    assert 0 < tuning.candidate_share <= 1
    assert tuning.sample == 60
    # The tuned probes measure what they claim on vectors that were not the sample.
    queries = base[:200] + 0.01 * np.random.default_rng(4).standard_normal((200, 32)).astype(np.float32)
    truth = brute_force(base, queries, 10)
    assert mean_recall(await lsh.query_many(queries, top_k=10), truth) >= 0.85
    # Saved with the index: another client adopts it, an explicit probes= wins.
    adopter = await make_lsh(prefix=lsh.prefix, store=InMemoryStore(), hashing=None)
    assert (await adopter._ready()).probes == tuning.probes
    explicit = await make_lsh(prefix=lsh.prefix, probes=7, hashing=None)
    assert (await explicit._ready()).probes == 7
    # save=False measures and changes nothing, here or for a client opened after.
    index = (await lsh._ready()).sharded
    saved = (await index.config_and_tuning())[1]
    what_if = await lsh.tune(1.0, sample=60, save=False)
    assert what_if.target_recall == 1.0 and (await index.config_and_tuning())[1] == saved
    assert (await lsh._ready()).probes == tuning.probes
    later = await make_lsh(prefix=lsh.prefix, hashing=None)
    assert (await later._ready()).probes == tuning.probes


async def test_tune_on_given_queries_measures_those(make_lsh: Any) -> None:
    """With queries= the truth is theirs (no id left out), and the recall tune
    reports is the recall those queries get with the chosen probes."""
    base = clustered(3000, 32, seed=2, spread=0.4)
    queries = clustered(80, 32, seed=9, spread=0.4)
    lsh = await make_lsh(store=InMemoryStore(), num_bands=16, rows_per_band=10)
    await lsh.index(np.arange(len(base)), base)
    tuning = await lsh.tune(0.9, queries=queries)
    assert tuning.sample == 80
    assert tuning.recall >= 0.9, tuning
    measured = mean_recall(await lsh.query_many(queries, top_k=10), brute_force(base, queries, 10))
    assert measured == pytest.approx(tuning.recall)
    with pytest.raises(
        ValueError, match=r"^tune\(\) has no queries: pass some, or fill the store that the index points into$"
    ):
        await lsh.tune(queries=np.empty((0, 32), np.float32))
    with pytest.raises(ValueError, match=r"^queries must have shape \(n, 32\) or \(32,\), got \(3, 7\)$"):
        await lsh.tune(queries=np.ones((3, 7), np.float32))


async def test_tune_asks_200_stored_vectors_for_their_top_10_by_default(make_lsh: Any) -> None:
    """The defaults of sample= and top_k=, each compared with the curve it
    gives when passed (uniform vectors: recall short of 1 at the first
    probes, so a curve at another top_k differs)."""
    uniform = np.random.default_rng(8).standard_normal((1200, 32)).astype(np.float32)
    queries = uniform[:40] + 0.3 * np.random.default_rng(9).standard_normal((40, 32)).astype(np.float32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(len(uniform)), uniform)
    by_default = await lsh.tune(0.99, queries=queries, save=False)
    at_10, at_11 = [await lsh.tune(0.99, queries=queries, top_k=k, save=False) for k in (10, 11)]
    assert by_default.curve == at_10.curve != at_11.curve
    assert (await lsh.tune(0.99, save=False)).sample == 200


async def test_tune_refuses_what_it_cannot_measure(make_lsh: Any) -> None:
    no_store = await make_lsh()
    with pytest.raises(ValueError, match=r"^tune\(\) needs a store: pass store="):
        await no_store.tune()
    empty = await make_lsh(store=InMemoryStore())
    with pytest.raises(ValueError, match=r"^tune\(\) needs a built index: this one is empty$"):
        await empty.tune()
    for target in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"^target_recall must be in \(0, 1\], got {target}$"):
            await empty.tune(target)
    with pytest.raises(ValueError, match=r"^top_k must be at least 1, got 0$"):
        await empty.tune(top_k=0)
    with pytest.raises(ValueError, match=r"^sample must be at least 1, got 0$"):
        await empty.tune(sample=0)


async def test_open_clients_adopt_a_new_tuning(make_lsh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that was open before another one ran tune() follows the saved
    probes from its next query after the refresh interval (that query
    included); ``probes=`` still wins."""
    import lshrs._lshrs

    base = clustered(3000, 32, seed=2, spread=0.4)
    tuner = await make_lsh(store=InMemoryStore())
    await tuner.index(np.arange(len(base)), base)
    reader = await make_lsh(hashing=None)
    pinned = await make_lsh(hashing=None, probes=3)
    before = (await reader._ready()).probes
    tuning = await tuner.tune(0.99, sample=40)
    assert tuning.probes != before  # else this test proves nothing
    monkeypatch.setattr(lshrs._lshrs, "TUNING_REFRESH", 0.0)
    planned = await planned_probes(reader, monkeypatch)
    await reader.query(base[0])
    assert planned == [tuning.probes]  # the query that read the new tuning already reads its buckets
    await pinned.query(base[0])
    assert (await reader._ready()).probes == tuning.probes
    assert (await pinned._ready()).probes == 3


async def test_a_query_that_outlives_close_does_not_reopen_its_client(
    redis_proc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query whose tuning refresh comes back after ``close()`` (Redis
    paused meanwhile) still answers, but does not hand the closed client its
    old index with the new probes: opened again, the client adopts the index
    the prefix holds by then (here rebuilt with the other family)."""
    import lshrs._lshrs

    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    given = Redis.from_url(url)  # a client of the caller's: close() leaves it open
    await given.flushdb()
    base = clustered(3000, 32, seed=2, spread=0.4)
    tuner = LSHRS(dim=32, redis_url=url, prefix="outlived", store=InMemoryStore())
    await tuner.index(np.arange(len(base)), base)
    reader = LSHRS(dim=32, redis=given, prefix="outlived", warm_in_background=False)
    before = (await reader._ready()).probes
    assert (await tuner.tune(0.99, sample=40)).probes != before  # else this test proves nothing
    monkeypatch.setattr(lshrs._lshrs, "TUNING_REFRESH", 0.0)
    await given.execute_command("CLIENT", "PAUSE", 300, "ALL")
    outliving = asyncio.ensure_future(reader.query(base[0], top_k=1))
    await anyio.sleep(0.1)  # the query waits on its refresh read
    await reader.close()
    assert (await outliving)[0].id == 0
    await tuner.drop()
    await tuner.close()
    rebuilt = LSHRS(dim=32, redis_url=url, prefix="outlived", hashing="hyperplane", store=InMemoryStore())
    await rebuilt.index(np.arange(len(base)), base)
    assert (await reader.query(base[0], top_k=1))[0].id == 0
    assert reader.config.hashing == "hyperplane"
    await rebuilt.drop()
    await rebuilt.close()
    await reader.close()
    await given.aclose()
