"""A build's batches hashed in parts on worker threads, with BLAS held to one
thread meanwhile (issue 12: a 1M build in 30 s). The work is pure numpy; the
threads and the BLAS limit are real."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from threadpoolctl import threadpool_info

from lshrs import _cores

pytestmark = pytest.mark.anyio


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cores.os, "cpu_count", lambda: 4)


@pytest.fixture
def blas() -> list[int]:
    before = _blas_threads()
    if not before:
        pytest.skip("numpy's BLAS is not one threadpoolctl can limit")
    if max(before) < 2:
        pytest.skip("BLAS runs one thread already: a limit to one would not show")
    return before


async def test_a_large_batch_is_cut_into_parts_and_joined_in_order(four_cores: None) -> None:
    rows = np.arange(20_000 * 3, dtype=np.float32).reshape(20_000, 3)
    seen: list[tuple[int, int]] = []  # (first row's value, thread) of each part

    def doubled(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
        seen.append((int(part[0, 0]), threading.get_ident()))
        return part[:, :1] * 2

    out = await _cores.in_parts(doubled, rows)
    assert np.array_equal(out, rows[:, :1] * 2)
    assert len(seen) == 4  # 20,000 rows, at least 4,096 a part, 4 cores
    assert threading.get_ident() not in {thread for _, thread in seen}  # off the event loop
    assert _cores.parts_for(4095) == 1


async def test_parts_run_with_one_blas_thread_and_the_limit_is_lifted_after(four_cores: None, blas: list[int]) -> None:
    during: list[list[int]] = []

    def observed(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
        during.append(_blas_threads())
        return part

    await _cores.in_parts(observed, np.zeros((10_000, 2), np.float32))
    assert during and all(max(threads) == 1 for threads in during)
    assert _blas_threads() == blas


async def test_overlapping_batches_keep_the_limit_until_the_last_ends(four_cores: None, blas: list[int]) -> None:
    first_done = threading.Event()
    late: list[list[int]] = []

    def quick(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return part

    def slow(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
        first_done.wait(10)
        late.append(_blas_threads())  # the quick batch has ended: still one thread
        return part

    async def quick_then_signal() -> None:
        await _cores.in_parts(quick, np.zeros((8192, 2), np.float32))
        first_done.set()

    await asyncio.gather(_cores.in_parts(slow, np.zeros((8192, 2), np.float32)), quick_then_signal())
    assert late and all(max(threads) == 1 for threads in late)
    assert _blas_threads() == blas  # and lifted once both ended


async def test_a_part_that_fails_raises_its_own_error(four_cores: None) -> None:
    def refused(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
        raise ValueError("this part is refused")

    with pytest.raises(ValueError, match="this part is refused"):
        await _cores.in_parts(refused, np.zeros((10_000, 2), np.float32))
    assert _cores._ONE_BLAS_THREAD.holders == 0
