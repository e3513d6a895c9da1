"""Progress of long calls (a build, a reconcile, a tune, exact stats): quiet unless asked;
asked, one tqdm bar per call, closed when the call ends, or a plain stderr
line every few seconds where tqdm is not installed; or the caller's own
``(done, total)`` callback, for services."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ._types import ProgressCallback

logger = logging.getLogger("lshrs")

#: Seconds between plain progress lines when tqdm is not installed.
LINE_EVERY = 2.0

Setting = bool | ProgressCallback | None


def check(progress: object) -> Setting:
    if progress is None or isinstance(progress, bool) or callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")


class _Bar:
    """One call's bar: tqdm where installed, else a line on stderr every
    ``LINE_EVERY`` seconds and one at the end."""

    def __init__(self, what: str, unit: str) -> None:
        self._what, self._unit = what, unit
        self._bar: Any = None
        self._last: tuple[int, int | None] | None = None
        self._shown: tuple[int, int | None] | None = None
        self._printed = 0.0
        self._started = time.time()  # tqdm's clock: its bar appears at the first count, timed from here
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm

    def __call__(self, done: int, total: int | None) -> None:
        self._last = (done, total)
        if self._tqdm is not None:
            if self._bar is None:
                self._bar = self._tqdm(total=total, unit=unit_name(self._unit), desc=f"lshrs {self._what}")
                # A build's first count comes when its first block is written:
                # timed from there, a one-block build showed 00:00 and 350,000 vectors/s.
                self._bar.start_t = self._started
            if total != self._bar.total:  # a call that ends early (tune() at its target) ends its bar there
                self._bar.total = total
            self._bar.update(done - self._bar.n)
        elif time.monotonic() - self._printed >= LINE_EVERY:
            self._line()

    def _line(self) -> None:
        assert self._last is not None
        done, total = self._last
        share = f" ({100 * done / total:.0f}%)" if total else ""
        of = f" of {total:,}" if total is not None else ""
        print(f"lshrs {self._what}: {done:,}{of} {self._unit}{share}", file=sys.stderr, flush=True)
        self._printed, self._shown = time.monotonic(), self._last

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._tqdm is None and self._last is not None and self._last != self._shown:
            self._line()  # the last count, once


def unit_name(unit: str) -> str:
    return {"vectors": "vec", "queries": "query", "bucket keys": "key", "probe settings": "setting"}.get(unit, unit)


@contextlib.contextmanager
def reporting(setting: Setting, what: str, unit: str = "vectors") -> Iterator[ProgressCallback | None]:
    """The reporter of one call, closed when the call ends (also on error)."""
    if setting is None or setting is False:
        yield None
    elif setting is True:
        bar = _Bar(what, unit)
        try:
            yield bar
        finally:
            bar.close()
    else:
        yield setting


def row_count(count: int) -> str:
    """``"1 row"``, ``"1,200 rows"``."""
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


def counted(reasons: Mapping[str, int]) -> str:
    """``"2 NULL vector, 1 wrong dimension"``: rows a build skipped, by reason."""
    return ", ".join(f"{count:,} {reason}" for reason, count in sorted(reasons.items()))


def note(message: str) -> None:
    """One line on stderr for a step with no count to show (fitting the
    buckets), for callers who asked for progress; logged as well."""
    logger.info(message)
    print(f"lshrs: {message}", file=sys.stderr, flush=True)
