"""Progress reporting for long builds: quiet unless asked, a tqdm bar if wanted."""

from __future__ import annotations

import logging
import sys
from typing import Any

from ._types import ProgressCallback

logger = logging.getLogger("lshrs")


class _Bar:
    """A tqdm bar where tqdm is installed, else a log line per batch."""

    def __init__(self) -> None:
        self._bar: Any = None
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm

    def __call__(self, done: int, total: int | None) -> None:
        if self._tqdm is None:
            logger.info("indexed %d of %s vectors", done, total if total is not None else "?")
            return
        if self._bar is None:
            self._bar = self._tqdm(total=total, unit="vec", desc="lshrs index")
        self._bar.update(done - self._bar.n)


def resolve(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    if progress is True:
        return _Bar()
    if progress is False or progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    return progress


def note(message: str) -> None:
    """One line on stderr for a step with no count to show (fitting the
    buckets), for callers who asked for progress; logged as well."""
    logger.info(message)
    print(f"lshrs: {message}", file=sys.stderr, flush=True)
