"""Every call ends within its deadline; overload is refused at once; a
vanished index is an error, not an empty answer (issue 13)."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import time
import warnings
from collections.abc import Awaitable
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest
import redis.exceptions
from redis.asyncio import Redis

from conftest import clustered, index_state
from lshrs import LSHRS, IndexMissing, Overloaded, Rows
from lshrs import _lshrs as lshrs_module
from lshrs._admission import WAITING_PER_SLOT, Admission, Call
from lshrs.adapters import InMemoryStore, PostgresStore, RedisStore, _postgres
from servers import postgres, redis_server

pytestmark = pytest.mark.anyio

DIM = 32
BASE = clustered(3000, DIM, seed=43)


def redis_url_of(redis_proc: Any, db: int) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/{db}"


async def test_a_call_keeps_its_own_deadline_on_a_frozen_server() -> None:
    """SIGSTOP: the server accepts and never answers. A call's timeout= ends
    it, however long the client's socket timeout is; writes end the same way
    and leave every id whole once the server thaws."""
    with redis_server() as server, redis_server() as store_server:
        store = RedisStore(store_server.url, prefix="vec")
        async with LSHRS(dim=DIM, redis_url=server.url, store=store, timeout=10.0) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            pid = server.executor.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                for name, call in (
                    ("query", lsh.query(BASE[3], top_k=1, timeout=0.3)),
                    ("query_many", lsh.query_many(BASE[3:5], timeout=0.3)),
                    ("ingest", lsh.ingest(600, BASE[600], timeout=0.3)),
                    ("delete", lsh.delete([4, 5], timeout=0.3)),
                    ("index", lsh.index(np.arange(800, 900), BASE[800:900], timeout=0.3)),
                ):
                    started = time.monotonic()
                    with pytest.raises(TimeoutError, match=rf"^{name}\(\) did not finish within its 0.3 s timeout$"):
                        await call
                    elapsed = time.monotonic() - started
                    assert 0.29 <= elapsed <= 0.45, elapsed
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (await lsh.query(BASE[7], top_k=1))[0].id == 7  # the same client works again
            client = Redis.from_url(server.url)
            # A lease command sent before the deadline may run after its release
            # once the server thaws; such a lease expires on its own.
            indexed = set(await index_state(client, lsh, leases=True))
            await client.aclose()
            held = set((await store.fetch(np.arange(900))).ids.tolist())
            assert indexed == held  # a write that timed out is whole in both, or in neither


async def test_the_client_timeout_is_each_calls_default(redis_proc: Any) -> None:
    """Without timeout=, the constructor's timeout bounds the whole call."""
    with redis_server() as server:
        async with LSHRS(dim=DIM, redis_url=server.url, timeout=0.4) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            os.kill(server.executor.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await lsh.query(BASE[3], top_k=1)
                assert time.monotonic() - started <= 0.6
            finally:
                os.kill(server.executor.process.pid, signal.SIGCONT)


async def test_queries_answered_as_one_batch_each_keep_their_own_deadline(redis_proc: Any) -> None:
    """Concurrent queries are answered together (``_coalesce``); the batch
    must run as long as one of its callers still waits, so a ``timeout=``
    longer than the client's is kept, while a caller in the same batch with
    a shorter one still times out at its own."""

    class SlowFetch(InMemoryStore):
        async def fetch(self, ids: np.ndarray) -> Rows:
            await asyncio.sleep(0.6)
            return await super().fetch(ids)

    store = SlowFetch()
    async with LSHRS(dim=DIM, redis_url=redis_url_of(redis_proc, 3), store=store, prefix="own", timeout=0.3) as lsh:
        await lsh.index(np.arange(1000), BASE[:1000])
        started = time.monotonic()
        short, long = await asyncio.gather(
            lsh.query(BASE[3], top_k=1), lsh.query(BASE[4], top_k=1, timeout=3.0), return_exceptions=True
        )
        assert isinstance(short, TimeoutError), short
        assert str(short) == "query() did not finish within its 0.3 s timeout"
        assert isinstance(long, list) and long[0].id == 4, long
        assert 0.6 <= time.monotonic() - started < 2.0
        await lsh.drop()


@pytest.mark.parametrize("max_waiting", [None, 0, 3])
async def test_overload_is_refused_at_once_and_the_rest_served(redis_proc: Any, max_waiting: int | None) -> None:
    """2 slots and 128 places in the queue by default (``max_waiting=0``:
    none, 3: three): of 500 queries sent at once, those that find the queue
    full (370, 498, 495) fail at once; every other one gets the answer it
    would get alone."""
    async with LSHRS(
        dim=DIM, redis_url=redis_url_of(redis_proc, 6), store=InMemoryStore(), max_inflight=2, max_waiting=max_waiting
    ) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(1000), BASE[:1000])
        expected = (await lsh.query(BASE[9], top_k=3))[0].id

        async def one(i: int) -> tuple[str, float]:
            started = time.monotonic()
            try:
                hits = await lsh.query(BASE[9], top_k=3)
            except Overloaded as refusal:
                assert "2 calls running and" in str(refusal) and "(max_inflight, max_waiting)" in str(refusal)
                return "refused", time.monotonic() - started
            assert hits[0].id == expected
            return "served", time.monotonic() - started

        outcomes = await asyncio.gather(*(one(i) for i in range(500)))
        refused = [took for what, took in outcomes if what == "refused"]
        queued = 2 * WAITING_PER_SLOT if max_waiting is None else max_waiting
        assert len(refused) == 500 - 2 - queued
        assert max(refused) < 0.005
        await lsh.drop()


async def test_a_wait_that_would_pass_the_deadline_is_refused() -> None:
    """The admission queue judges the wait from how long calls held their
    slot: past half the time left, it refuses at once; within it, it waits."""
    admission = Admission(1)

    async def hold(seconds: float) -> None:
        async with admission.slot(None):
            await anyio.sleep(seconds)

    await hold(0.2)  # teaches it that a call holds its slot about 0.2 s
    async with anyio.create_task_group() as group:
        group.start_soon(hold, 0.2)
        await anyio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="past half the"):
            async with admission.slot(0.1):
                pass
        assert time.monotonic() - started < 0.005
        # About 0.4 s expected (0.2 s waiting, 0.2 s its own): within 0.6 s
        # on average, but past half of it, so as likely to time out as not.
        with pytest.raises(Overloaded, match="past half the"):
            async with admission.slot(0.6):
                pass
        async with admission.slot(2.0):  # within half of it: waits its turn, then runs
            assert time.monotonic() - started >= 0.15
    assert admission.refused == 2


async def test_calls_that_time_out_do_not_teach_it_that_calls_are_short() -> None:
    """A call cut off by its deadline held its slot only until then: counted
    as a short call, it would make the queue admit more calls exactly when
    they are timing out (measured under load: 4 of 5 admitted calls then
    timed out)."""
    admission = Admission(1)

    async def hold(seconds: float, deadline: float | None = None) -> None:
        with anyio.move_on_after(deadline if deadline is not None else math.inf):
            async with admission.slot(None):
                await anyio.sleep(seconds)

    await hold(0.2)  # a call holds its slot about 0.2 s
    for _ in range(5):
        await hold(1.0, deadline=0.01)  # cut off after 0.01 s
    async with anyio.create_task_group() as group:
        group.start_soon(hold, 0.2)
        await anyio.sleep(0.01)
        # 0.2 s waiting plus 0.2 s its own: past half of 0.6 s. Taught by the
        # cut-off calls, it would expect 0.25 s and let the call in.
        with pytest.raises(Overloaded, match="past half the"):
            async with admission.slot(0.6):
                pass


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    admission = Admission(1)
    release = anyio.Event()

    async def holder() -> None:
        async with admission.slot(None):
            await release.wait()

    async with anyio.create_task_group() as group:
        group.start_soon(holder)
        await anyio.sleep(0.01)
        with anyio.move_on_after(0.05):
            async with admission.slot(None):
                raise AssertionError("the slot is held")
        release.set()
    with anyio.fail_after(1):
        async with admission.slot(None):  # nothing leaked: the slot is free
            pass


async def test_a_gather_of_thousands_of_queries_waits_its_turn(redis_proc: Any) -> None:
    """The queue holds 64 calls a slot so that a service's ``gather()`` of a
    few thousand queries just waits with the defaults; only a full queue or
    a wait past the deadline is refused."""
    async with LSHRS(dim=DIM, redis_url=redis_url_of(redis_proc, 6), store=InMemoryStore(), timeout=60) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(1000), BASE[:1000])
        answers = await asyncio.gather(*(lsh.query(BASE[i % 1000], top_k=1) for i in range(3000)))
        assert [hits[0].id for hits in answers] == [i % 1000 for i in range(3000)]
        await lsh.drop()


async def test_waiters_get_their_slots_in_arrival_order() -> None:
    admission = Admission(1)
    order: list[int] = []
    release = anyio.Event()

    async def holder() -> None:
        async with admission.slot(None):
            await release.wait()

    async def waiter(i: int) -> None:
        async with admission.slot(None):
            order.append(i)

    async with anyio.create_task_group() as group:
        group.start_soon(holder)
        await anyio.sleep(0.01)
        for i in range(5):
            group.start_soon(waiter, i)
            await anyio.sleep(0.005)  # each queued before the next arrives
        release.set()
    assert order == [0, 1, 2, 3, 4]


async def test_a_waiter_cancelled_as_its_slot_arrives_passes_it_on() -> None:
    """Handed a slot in the same loop turn as it is cancelled, a waiter is no
    longer in the queue: it must give the slot back, or the slot leaks."""
    admission = Admission(1)
    turn = admission.enter(None)
    assert turn is None  # the only slot, taken
    queued = admission.enter(None)
    assert queued is not None

    async def waiter() -> None:
        await admission.wait(queued)

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0.01)
    admission.leave(0.01)  # hands the slot to the waiter...
    task.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.enter(None) is None  # the slot came back


def held_for(admission: Admission, seconds: float, times: int) -> None:
    """``times`` calls, one after another, each holding the slot ``seconds``."""
    for _ in range(times):
        assert admission.enter(None) is None
        admission.leave(seconds)


async def test_one_slow_call_moves_the_hold_estimate_a_tenth() -> None:
    """The hold estimate is smoothed: one slow call among quick ones must not
    make the queue refuse everything, nor one quick call admit too much."""
    admission = Admission(1)
    held_for(admission, 0.01, times=50)
    admission.enter(None)
    admission.leave(1.0)
    assert 0.1 <= admission._hold <= 0.12  # 0.9 * 0.01 + 0.1 * 1.0


async def test_a_call_counts_its_own_work_not_its_wait_and_a_cut_call_no_less() -> None:
    """``Call`` is the path every public method takes: the time a call held
    its slot starts when it gets the slot, and a call cut off by its deadline
    never lowers the estimate."""
    admission = Admission(1)

    async def call(seconds: float, deadline: float | None = None) -> None:
        async with Call(admission, deadline, "a call"):
            await anyio.sleep(seconds)

    held_for(admission, 0.01, times=50)  # calls hold their slot 0.01 s
    async with anyio.create_task_group() as group:
        group.start_soon(call, 0.3)  # the estimate: 0.9 * 0.01 + 0.1 * 0.3 = 0.039
        await anyio.sleep(0.01)
        await call(0.01)  # waits about 0.3 s for its slot, then works 0.01 s
    assert admission._hold < 0.05  # 0.9 * 0.039 + 0.1 * 0.01, not + 0.1 * 0.31
    before = admission._hold
    with pytest.raises(TimeoutError, match=r"^a call did not finish within its 0\.02 s timeout$"):
        await call(1.0, deadline=0.02)
    assert admission._hold >= before - 1e-9  # 0.9 * h + 0.1 * h may round below h


async def test_a_redis_flushed_under_a_live_client_is_an_error(
    redis_proc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis restarted empty or flushed must not answer [] or grow a new
    index behind the user's back."""
    monkeypatch.setattr(lshrs_module, "TUNING_REFRESH", 0.0)
    url = redis_url_of(redis_proc, 7)
    client = Redis.from_url(url)
    async with LSHRS(dim=DIM, redis_url=url, store=InMemoryStore()) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(500), BASE[:500])
        assert (await lsh.query(BASE[1], top_k=1))[0].id == 1
        await client.flushdb()
        with pytest.raises(IndexMissing, match="'lshrs' is gone"):
            await lsh.query(BASE[1], top_k=1)
        with pytest.raises(IndexMissing):
            await lsh.ingest(501, BASE[501])
        with pytest.raises(IndexMissing):
            await lsh.delete([1])
        assert await client.dbsize() == 0  # nothing recreated
        await lsh.close()
        assert await lsh.index(np.arange(300), BASE[:300]) == 300  # reopened on purpose: a new index
        await client.flushdb()
        async with LSHRS(dim=DIM, redis_url=url, hashing="hyperplane") as other:  # another index in its place
            await other.index(np.arange(300), BASE[:300])
            with pytest.raises(IndexMissing, match="'lshrs' was replaced by another configuration"):
                await lsh.query(BASE[1], top_k=1)
            await other.drop()
    await client.aclose()


async def test_a_failed_streamed_build_raises_the_redis_error_itself() -> None:
    """A build whose Redis goes away raises redis's ConnectionError, which
    ``except redis.ConnectionError`` catches, not an ExceptionGroup."""
    with redis_server() as server:
        store = InMemoryStore()
        await store.put(np.arange(3000), BASE, None)
        lsh = LSHRS(dim=DIM, redis_url=server.url, store=store, hashing="hyperplane", batch_size=100, timeout=2.0)
        build = asyncio.ensure_future(lsh.index())
        watcher = Redis.from_url(server.url)
        for _ in range(4000):
            if await watcher.hlen("{lshrs:0}:s") >= 300:
                break
            await anyio.sleep(0.002)
        await watcher.aclose()
        server.executor.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await build
        await lsh.close()


async def test_an_evicting_redis_is_warned_about() -> None:
    """A policy that may evict the index's keys is a warning, word for word;
    a server that refuses CONFIG (managed services do) opens quietly."""
    said = (
        "Redis runs with maxmemory-policy allkeys-lru: it may evict the index's keys, which loses "
        "results silently; run the index's Redis with maxmemory-policy noeviction"
    )
    with redis_server("--maxmemory-policy", "allkeys-lru") as server, pytest.warns(RuntimeWarning, match="noeviction"):
        async with LSHRS(dim=DIM, redis_url=server.url):
            pass
        with pytest.warns(RuntimeWarning, match="noeviction") as warned:
            lsh = LSHRS(dim=DIM, redis_url=server.url)
            await lsh.open()  # the warning names this line, not lshrs's own
        assert warned[0].filename == __file__, warned[0]
        assert str(warned[0].message) == said
        await lsh.close()
    with redis_server() as server, warnings.catch_warnings():
        warnings.simplefilter("error")
        async with LSHRS(dim=DIM, redis_url=server.url):
            pass
    no_config = [
        "--maxmemory-policy",
        "allkeys-lru",
        "--user",
        "default",
        "on",
        "nopass",
        "~*",
        "&*",
        "+@all",
        "-config",
    ]
    with redis_server(*no_config) as server, warnings.catch_warnings():
        warnings.simplefilter("error")
        async with LSHRS(dim=DIM, redis_url=server.url):
            pass


@pytest.mark.parametrize(
    "options", [{"timeout": 0}, {"timeout": -1.0}, {"timeout": math.inf}, {"timeout": "1"}, {"max_inflight": 0}]
)
def test_bad_deadline_settings(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        LSHRS(dim=DIM, **options)


async def test_a_bad_per_call_timeout_is_refused(redis_proc: Any) -> None:
    async with LSHRS(dim=DIM, redis_url=redis_url_of(redis_proc, 6), prefix="badtimeout") as lsh:
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            await lsh.query(BASE[0], timeout=0)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            await lsh.delete([1], timeout=float("nan"))
        await lsh.drop()


async def test_a_write_cut_by_its_deadline_is_whole_in_store_and_index() -> None:
    """The deadline passes between the store write and the index write of
    ingest(): the store's Redis is frozen while the lease is taken, then the
    index's Redis while the store write completes. Once begun, the write
    finishes both halves when the index thaws, so every id ends in both or
    neither; a write cancelled between them leaves the vector in the store alone."""
    with redis_server() as server, redis_server() as store_server:
        store = RedisStore(store_server.url, prefix="vec")
        async with LSHRS(dim=DIM, redis_url=server.url, store=store, hashing="hyperplane") as lsh:
            await lsh.index(np.arange(10), BASE[:10])
            index_pid, store_pid = server.executor.process.pid, store_server.executor.process.pid
            os.kill(store_pid, signal.SIGSTOP)
            writes = [asyncio.ensure_future(lsh.ingest(100 + i, BASE[100 + i], timeout=0.3)) for i in range(3)]
            await anyio.sleep(0.1)  # leases taken, store writes waiting
            os.kill(index_pid, signal.SIGSTOP)
            os.kill(store_pid, signal.SIGCONT)
            await anyio.sleep(0.5)  # store writes done, index writes waiting, deadlines passed
            os.kill(index_pid, signal.SIGCONT)
            await asyncio.wait(writes)
            await anyio.sleep(0.2)  # anything sent has landed
            client = Redis.from_url(server.url)
            indexed = set(await index_state(client, lsh))
            await client.aclose()
            held = set((await store.fetch(np.arange(200))).ids.tolist())
            assert held >= {100, 101, 102}  # the store writes did complete
            assert indexed == held


async def assert_times_out_soon(call: Awaitable[Any], expected: str) -> None:
    """``call`` raises the built-in TimeoutError (on every Python: asyncpg's
    own is another class before 3.11) matching ``expected``, within 5 s."""
    started = time.monotonic()
    with anyio.move_on_after(10), pytest.raises(TimeoutError, match=expected) as raised:
        await call
    assert type(raised.value) is TimeoutError
    assert time.monotonic() - started < 5


async def test_a_store_connecting_to_a_frozen_postgres_gives_up_at_its_command_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that accepts connections and never answers them (its
    postmaster frozen: the kernel still completes the TCP handshake) is not
    waited on past ``command_timeout``, nor forever without one: connecting
    then takes asyncpg's 60 s at most (made 1 s here, and 100 s while the
    store with a limit of its own connects, which must not wait for it)."""
    named = r"^PostgreSQL did not answer PostgresStore\.count\(\) on table 't' within "
    limits = {
        1.0: (100.0, r"command_timeout=1 s$"),
        None: (1.0, r"the 1 s a connection may take \(command_timeout=None\)$"),
    }
    with postgres() as server:
        conn = await asyncpg.connect(server.url)
        data = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
        await conn.close()
        postmaster = int((await anyio.Path(data, "postmaster.pid").read_text()).split()[0])
        stores = {limit: PostgresStore(server.url, table="t", command_timeout=limit) for limit in limits}
        os.kill(postmaster, signal.SIGSTOP)
        try:
            for limit, (connect_seconds, expected) in limits.items():
                monkeypatch.setattr(_postgres, "_CONNECT_SECONDS", connect_seconds)
                await assert_times_out_soon(stores[limit].count(), named + expected)
        finally:
            # asyncpg leaves a connection that timed out with its socket open
            # until it is collected; thawed, the server would wait on it for
            # a startup packet (authentication_timeout, 60 s) before stopping.
            gc.collect()
            await anyio.sleep(0.1)  # the sockets close on the loop's next passes
            os.kill(postmaster, signal.SIGCONT)
            # As root the server runs under runuser, which stops itself when its
            # child stops (job control) and would then not pass on the shutdown.
            assert server.executor.process is not None
            os.kill(server.executor.process.pid, signal.SIGCONT)
        for store in stores.values():
            await store.close()


async def test_a_build_over_a_frozen_postgres_ends_at_the_stores_command_timeout(redis_proc: Any) -> None:
    """A build has no deadline of its own (it may take minutes): what bounds
    a wait on a PostgreSQL that accepts and never answers is the store's
    ``command_timeout``. Its backend is frozen (SIGSTOP), not the server, so
    the test's own connection still answers."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/6"
    with postgres() as server:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, embedding bytea)")
        await conn.executemany("INSERT INTO t VALUES ($1, $2)", [(i, BASE[i].tobytes()) for i in range(300)])
        store = PostgresStore(server.url, table="t", pool_size=1, command_timeout=1.0)
        assert await store.count() == 300  # the pool's one connection is open
        backend = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        async with LSHRS(dim=DIM, redis_url=url, prefix="frozenpg", store=store) as lsh:
            await lsh.drop()
            os.kill(backend, signal.SIGSTOP)
            try:
                # Without a timeout, it would wait on.
                expected = r"PostgreSQL did not answer PostgresStore\.\w+\(\) on table 't' within command_timeout=1 s"
                await assert_times_out_soon(lsh.index(), expected)
            finally:
                os.kill(backend, signal.SIGCONT)
        await store.close()
        await conn.close()


async def test_calls_leave_no_cyclic_garbage(redis_proc: Any) -> None:
    """A latency-first service may turn the cycle collector off once it has
    started (Guarantees, Load: its pauses are what makes calls overrun their
    deadlines). That is safe only if lshrs's calls, served, refused and timed
    out alike, leave no reference cycles for a collection to free."""
    url, store = redis_url_of(redis_proc, 6), InMemoryStore()
    async with (
        LSHRS(dim=DIM, redis_url=url, prefix="cycles", store=store) as lsh,
        LSHRS(dim=DIM, redis_url=url, prefix="cycles", store=store, max_inflight=1, max_waiting=0) as strict,
    ):
        await lsh.drop()
        await lsh.index(np.arange(1000), BASE[:1000])

        async def calls(turn: int) -> None:
            await lsh.query(BASE[turn], top_k=5)
            await asyncio.gather(*(lsh.query(BASE[turn + i], top_k=5) for i in range(8)))  # one batch
            await lsh.query_many(BASE[turn : turn + 4], top_k=5)
            await lsh.ingest(2000 + turn, BASE[2000 + turn])
            await lsh.delete([2000 + turn])
            with pytest.raises(TimeoutError):
                await lsh.query(BASE[turn], timeout=1e-9)
            outcomes = await asyncio.gather(*(strict.query(BASE[turn]) for _ in range(3)), return_exceptions=True)
            assert [type(o) for o in outcomes] == [list, Overloaded, Overloaded]

        await calls(0)  # caches, scripts and connections made once, as at start-up
        gc.collect()
        gc.disable()
        try:
            for turn in range(1, 31):
                await calls(turn)
            left = gc.collect()
        finally:
            gc.enable()
        assert left == 0
        await lsh.drop()
