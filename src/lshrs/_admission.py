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
from types import TracebackType

import anyio

from ._errors import Overloaded, lost_connection

Traceback = TracebackType | None


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


#: A queued call is admitted only if it is expected to finish within this
#: share of its time left. The expectation is an average, so a call admitted
#: at its deadline's edge times out about half the time, after costing its
#: caller the whole deadline, where a refusal costs nothing. Measured with
#: benchmarks/load.py's harness (10,000 callers, 1 s deadlines, two 15 s
#: runs): 3,858 calls timed out after getting their slot with the edge at
#: 1, 390 with it at 1/2.
ADMIT_WITHIN = 0.5


class Admission:
    """At most ``limit`` calls run at once and ``waiting`` more (by default
    ``WAITING_PER_SLOT * limit``) wait, in arrival order. A call that would
    not finish within half its time left, judged from how long recent calls
    held their slot, is refused at once (``Overloaded``). Memory stays bounded whatever arrives: refused
    calls hold nothing."""

    def __init__(self, limit: int, waiting: int | None = None) -> None:
        self.limit = limit
        self.most_waiting = WAITING_PER_SLOT * limit if waiting is None else waiting
        self._running = 0
        self._waiting: collections.deque[anyio.Event] = collections.deque()
        self._hold = 0.0  # seconds a call held its slot, smoothed
        self.refused = 0

    def enter(self, remaining: float | None) -> anyio.Event | None:
        """Take a slot (None), or a place in the queue (the event that hands
        over a slot), or raise ``Overloaded``. Synchronous, so that refusing
        costs a few microseconds under overload, when refusals are most calls."""
        if self._running < self.limit and not self._waiting:
            self._running += 1
            return None
        if len(self._waiting) >= self.most_waiting:
            self.refused += 1
            raise Overloaded(
                f"{self._running} calls running and {len(self._waiting)} waiting (max_inflight, max_waiting)"
            )
        # The wait for a slot, then the call's own work: admitting a call that
        # gets its slot just before its deadline would only time it out later.
        expected = self._hold * ((len(self._waiting) + 1) / self.limit + 1)
        if remaining is not None and expected > ADMIT_WITHIN * remaining:
            self.refused += 1
            raise Overloaded(
                f"the call would take about {expected:.3g} s, past half the {remaining:.3g} s left (max_inflight)"
            )
        turn = anyio.Event()
        self._waiting.append(turn)
        return turn

    async def wait(self, turn: anyio.Event) -> None:
        """Wait for a queued call's slot; a call given up while waiting leaves the queue."""
        try:
            await turn.wait()
        except BaseException:
            if turn in self._waiting:
                self._waiting.remove(turn)
            else:  # handed a slot while being cancelled: pass it on
                self._release()
            raise

    def leave(self, held: float, finished: bool = True) -> None:
        """Give the slot back, after holding it ``held`` seconds. A call that
        did not finish (timed out, cancelled, failed) only says its work takes
        at least ``held``: counting it as a short call would admit more calls
        exactly when they are timing out."""
        if not finished:
            held = max(held, self._hold)
        self._hold = held if self._hold == 0.0 else 0.9 * self._hold + 0.1 * held
        self._release()

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # the slot passes straight to the next caller
        else:
            self._running -= 1

    @contextlib.asynccontextmanager
    async def slot(self, remaining: float | None) -> AsyncIterator[None]:
        turn = self.enter(remaining)
        if turn is not None:
            await self.wait(turn)
        started = anyio.current_time()
        try:
            yield
        except BaseException:
            self.leave(anyio.current_time() - started, finished=False)
            raise
        self.leave(anyio.current_time() - started)


class Call:
    """One public call: its slot, then its deadline around all its work.
    ``Call(...)`` is built before ``async with``, so a refused call raises
    ``Overloaded`` from the constructor, without entering anything."""

    def __init__(self, admission: Admission, seconds: float | None, what: str) -> None:
        self._turn = admission.enter(seconds)
        self._admission, self._seconds, self._what = admission, seconds, what
        self._scope: anyio.CancelScope | None = None
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = anyio.current_time()
        if self._seconds is not None:
            self._scope = anyio.CancelScope(deadline=self._started + self._seconds)
            self._scope.__enter__()
        if self._turn is not None:
            try:
                await self._admission.wait(self._turn)
            except BaseException as exc:
                self._exit_scope(type(exc), exc, exc.__traceback__)
                raise
        self._started = anyio.current_time()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Traceback) -> None:
        self._admission.leave(anyio.current_time() - self._started, finished=kind is None)
        self._exit_scope(kind, exc, tb)
        lost = lost_connection(exc)
        if lost is not None:
            raise lost from exc

    def _exit_scope(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Traceback) -> None:
        """Leave the deadline's scope; the scope swallows only its own
        cancellation, which becomes the call's ``TimeoutError``."""
        if self._scope is not None and self._scope.__exit__(kind, exc, tb):
            raise TimeoutError(f"{self._what} did not finish within its {self._seconds:g} s timeout")
