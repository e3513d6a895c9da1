"""Deadlines and admission: every call ends within its timeout, and an
overloaded client refuses work at once instead of queueing it without limit.

Measured before this existed (``nox -s load``, 10,000 queries in flight): the
socket timeout bounded each Redis command, not the call, and the median query
took 45 s. A service behind lshrs must instead answer late work with a fast
error it can turn into a 503.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import AsyncIterator, Iterator

import anyio

from ._errors import Overloaded


def check_timeout(name: str, timeout: object, none: bool = True) -> None:
    if timeout is None and none:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        also = " (or None for no limit)" if none else ""
        raise ValueError(f"{name} must be a positive number of seconds{also}, got {timeout!r}")


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Cancel the enclosed work after ``seconds`` and raise ``TimeoutError``
    naming the call; a ``TimeoutError`` from inside (a Redis socket timeout,
    ``Overloaded``) passes through unchanged."""
    if seconds is None:
        yield
        return
    with anyio.CancelScope(deadline=anyio.current_time() + seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise TimeoutError(f"{what} did not finish within its {seconds:g} s timeout")


#: Calls that may wait for a slot, per slot: enough that ``gather`` of a few
#: thousand queries just waits, while the deadline check refuses what would
#: wait too long, and the queue stays bounded.
WAITING_PER_SLOT = 64


class Admission:
    """At most ``limit`` calls run at once and ``WAITING_PER_SLOT * limit``
    more wait, in arrival order. A call that would wait past its deadline, judged from how
    long recent calls held their slot, is refused at once (``Overloaded``).
    Memory stays bounded whatever arrives: refused calls hold nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running = 0
        self._waiting: collections.deque[anyio.Event] = collections.deque()
        self._hold = 0.0  # seconds a call held its slot, smoothed
        self.refused = 0

    def _expected_wait(self) -> float:
        return self._hold * (len(self._waiting) + 1) / self.limit

    @contextlib.asynccontextmanager
    async def slot(self, remaining: float | None) -> AsyncIterator[None]:
        if self._running >= self.limit or self._waiting:
            if len(self._waiting) >= WAITING_PER_SLOT * self.limit:
                self.refused += 1
                raise Overloaded(f"{self._running} calls running and {len(self._waiting)} waiting (max_inflight)")
            if remaining is not None and self._expected_wait() > remaining:
                self.refused += 1
                raise Overloaded(
                    f"a slot would take about {self._expected_wait():.3g} s, past the {remaining:.3g} s left"
                )
            turn = anyio.Event()
            self._waiting.append(turn)
            try:
                await turn.wait()
            except BaseException:
                if turn in self._waiting:
                    self._waiting.remove(turn)
                else:  # handed a slot while being cancelled: pass it on
                    self._release()
                raise
        else:
            self._running += 1
        started = anyio.current_time()
        try:
            yield
        finally:
            held = anyio.current_time() - started
            self._hold = held if self._hold == 0.0 else 0.9 * self._hold + 0.1 * held
            self._release()

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # the slot passes straight to the next caller
        else:
            self._running -= 1
