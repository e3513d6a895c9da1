"""Progress: one bar per call, closed when the call ends; plain lines on
stderr without tqdm; the caller's callback as given (issue 14)."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import pytest

from conftest import clustered
from lshrs import LSHRS, _progress
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio

DIM = 16
BASE = clustered(1200, DIM, seed=61)


def url_of(redis_proc: Any) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/3"


async def test_each_call_gets_its_own_bar(redis_proc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="bars", progress=True, batch_size=200) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(600), BASE[:600])
        first = capsys.readouterr().err
        await lsh.index(np.arange(600, 1000), BASE[600:1000])
        second = capsys.readouterr().err
        await lsh.ingest(5000, BASE[1100])  # one id: no bar
        third = capsys.readouterr().err
        await lsh.drop()
    assert "600/600" in first and first.endswith("\n")  # closed: the bar ends its line
    assert "fitting " in first and "fitted " in first  # the first build trained the partition, and said so
    assert "400/400" in second and "1000" not in second  # a new bar, not the first one continued
    assert "lshrs index" not in third


async def test_without_tqdm_plain_lines(
    redis_proc: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    store = InMemoryStore()
    await store.put(np.arange(1200), BASE, None)
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="plain", store=store, batch_size=300) as lsh:
        await lsh.drop()
        await lsh.index(progress=True)
        err = capsys.readouterr().err
        report = await lsh.reconcile(progress=True)
        again = capsys.readouterr().err
        await lsh.drop()
    lines = [line for line in err.splitlines() if line.startswith("lshrs index:")]
    assert lines[-1] == "lshrs index: 1,200 of 1,200 vectors (100%)"
    assert len(lines) == len(set(lines))  # the last count is not printed twice
    assert "lshrs: fitting" in err  # the training step is announced
    assert report.unchanged == 1200 and "lshrs reconcile: 1,200 of 1,200 vectors (100%)" in again


async def test_a_build_without_progress_writes_nothing_on_stderr(
    redis_proc: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fitting the partition is announced on stderr only to callers who
    asked for progress (else it is logged)."""
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="quiet") as lsh:
        await lsh.drop()
        capsys.readouterr()
        await lsh.index(np.arange(600), BASE[:600])
        assert capsys.readouterr().err == ""
        await lsh.drop()


async def test_a_callback_sees_every_batch(redis_proc: Any) -> None:
    seen: list[tuple[int, int | None]] = []
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="calls", batch_size=250) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(1000), BASE[:1000], progress=lambda done, total: seen.append((done, total)))
        await lsh.index(np.arange(1000, 1200), BASE[1000:1200], progress=lambda *counts: seen.append(counts))
        await lsh.drop()
    # A batch of one write (200 of at most 250) reports once, as done.
    assert seen == [(250, 1000), (500, 1000), (750, 1000), (1000, 1000), (200, 200)]


def test_a_bar_is_timed_from_the_start_of_its_call(capsys: pytest.CaptureFixture[str]) -> None:
    """The first count of a build comes when its first block is written: a
    bar created then showed a one-block build as taking no time at all."""
    pytest.importorskip("tqdm")
    with _progress.reporting(True, "index") as report:
        assert report is not None
        time.sleep(1.1)  # the fitting and the first block
        report(10, 10)
    assert "[00:01<" in capsys.readouterr().err


async def test_exact_stats_report_the_bucket_keys_read(redis_proc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``stats(exact=True)`` reads every bucket key, a thousand a script:
    seconds for millions of hyperplane buckets, so it reports as it goes."""
    seen: list[tuple[int, int | None]] = []
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="stats", hashing="hyperplane") as lsh:
        await lsh.drop()
        await lsh.index(np.arange(1200), BASE)
        stats = await lsh.stats(exact=True, progress=lambda done, total: seen.append((done, total)))
        sampled = await lsh.stats(progress=True)
        await lsh.drop()
    assert stats["buckets"] > 2000 and seen[-1] == (stats["buckets"], None)
    assert [done for done, _ in seen] == [*range(1000, stats["buckets"], 1000), stats["buckets"]]
    bar = capsys.readouterr().err
    assert sampled["bucket_statistics"].startswith("sampled") and "lshrs stats" in bar and "5000" in bar


async def test_a_tune_that_reaches_its_target_ends_its_count_full(redis_proc: Any, capsys: Any) -> None:
    """tune() stops at the first probe setting that reaches the target: its
    last count says so (n of n), not that it stopped midway (n of 16). Its
    bar names it."""
    seen: list[tuple[int, int | None]] = []
    store = InMemoryStore()
    uniform = np.random.default_rng(5).standard_normal((1200, DIM))  # no clusters: a ladder of several steps
    await store.put(np.arange(1200), uniform, None)
    async with LSHRS(dim=DIM, redis_url=url_of(redis_proc), prefix="tuned", store=store) as lsh:
        await lsh.drop()
        await lsh.index()
        tuning = await lsh.tune(0.98, sample=20, progress=lambda done, total: seen.append((done, total)))
        capsys.readouterr()
        await lsh.tune(0.98, sample=20, progress=True, save=False)
        assert "lshrs tune" in capsys.readouterr().err
        await lsh.drop()
    ladder = len(seen) - 1
    assert ladder >= 1 and len(tuning.curve) == len(seen) and seen[-1] == (len(seen), len(seen))
    assert all(total == seen[0][1] and total > len(seen) for _, total in seen[:ladder])
