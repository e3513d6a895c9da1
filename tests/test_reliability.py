"""Faults, security and cancellation on real servers (DESIGN section 6)."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest
import redis.exceptions

from conftest import clustered, index_state
from lshrs import LSHRS
from lshrs._index import packed_id
from lshrs.adapters import InMemoryStore, PostgresStore
from servers import postgres, redis_server

pytestmark = pytest.mark.anyio

DIM = 32
BASE = clustered(6000, DIM, seed=41)


async def signatures_of(url: str, prefix: str) -> dict[int, bytes]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    async with LSHRS(dim=DIM, redis_url=url, prefix=prefix) as lsh:
        state = await index_state(client, lsh)
    await client.aclose()
    return state


async def restart(server: Any) -> None:
    """Start a stopped server again and wait until its append-only file is loaded."""
    from redis.asyncio import Redis

    server.executor.start()
    client = Redis.from_url(server.url)
    for _ in range(200):
        try:
            if (await client.info("persistence"))["loading"] == 0:
                break
        except redis.exceptions.ConnectionError:  # BusyLoadingError is one
            pass
        await anyio.sleep(0.05)
    await client.aclose()


async def rerun_equals_clean_build(url: str, prefix: str, at_least: int) -> None:
    """After a build was cut off: what survived is whole ids (``index_state``
    checks each), and running the build again gives exactly a clean build."""
    partial = await signatures_of(url, prefix)
    assert at_least <= len(partial) < 6000
    async with LSHRS(dim=DIM, redis_url=url, prefix=prefix) as again:
        assert await again.index(np.arange(6000), BASE) == 6000
    async with LSHRS(dim=DIM, redis_url=url, prefix="clean") as clean:
        await clean.index(np.arange(6000), BASE)
    assert await signatures_of(url, prefix) == await signatures_of(url, "clean")


async def test_redis_restart_mid_build_then_rerun_equals_clean_build() -> None:
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        batches = 0

        def stop_after_two(done: int, total: int | None) -> None:
            nonlocal batches
            batches += 1
            if batches == 2:
                server.executor.stop()

        lsh = LSHRS(dim=DIM, redis_url=server.url, prefix="build", batch_size=1000, timeout=2.0)
        with pytest.raises(redis.exceptions.ConnectionError):
            await lsh.index(np.arange(6000), BASE, progress=stop_after_two)
        await lsh.close()
        await restart(server)  # the append-only file brings back what was acknowledged
        await rerun_equals_clean_build(server.url, "build", at_least=2000)


async def test_a_frozen_redis_fails_within_the_timeout() -> None:
    """A server that accepts and never answers (SIGSTOP): a call with no
    deadline of its own (a build, a count) is ended by the socket timeout,
    within its bound and not much later; once the server thaws the same
    client works again."""
    with redis_server() as server:
        async with LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), timeout=1.0) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            pid = server.executor.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                took = []
                for call in (lsh.count(), lsh.index(np.arange(500, 600), BASE[500:600])):
                    started = time.monotonic()
                    with pytest.raises(redis.exceptions.TimeoutError):
                        await asyncio.wait_for(call, 10)  # fail, not hang, without socket timeouts
                    took.append(time.monotonic() - started)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert all(0.9 <= elapsed <= 1.6 for elapsed in took), took
            assert (await lsh.query(BASE[4], top_k=1))[0].id == 4


async def test_redis_killed_during_writes_then_rerun_equals_clean_build() -> None:
    """SIGKILL, not a shutdown: the server dies while write scripts run. The
    append-only file brings back whole scripts only, so every id is whole, and
    re-running the build gives exactly the clean build."""
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        from redis.asyncio import Redis

        lsh = LSHRS(dim=DIM, redis_url=server.url, prefix="killed", batch_size=500, timeout=2.0)
        build = asyncio.ensure_future(lsh.index(np.arange(6000), BASE))
        watcher = Redis.from_url(server.url)
        for _ in range(4000):  # poll: the kill must land while write scripts are running
            if int(await watcher.get("{killed:0}:n") or 0) >= 1500:  # the shard's id count (grouped records)
                break
            await anyio.sleep(0.005)
        os.kill(server.executor.process.pid, signal.SIGKILL)
        await watcher.aclose()
        with pytest.raises(redis.exceptions.ConnectionError):
            await build
        await lsh.close()
        server.executor.process.wait()
        server.executor.process = None  # it died outside mirakuru's hands: let it start a new one
        await restart(server)
        await rerun_equals_clean_build(server.url, "killed", at_least=1500)


async def test_dropped_redis_fails_fast_and_recovers() -> None:
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        async with LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), timeout=1.0) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            assert (await lsh.query(BASE[3], top_k=1))[0].id == 3
            server.executor.stop()
            started = time.monotonic()
            with pytest.raises(redis.exceptions.ConnectionError):
                await lsh.query(BASE[3], top_k=1)
            assert time.monotonic() - started < 5
            await restart(server)
            assert (await lsh.query(BASE[4], top_k=1))[0].id == 4  # the same object recovers


async def test_the_first_call_after_a_quiet_restart_succeeds() -> None:
    """Redis restarts between two calls: the pooled connections are dead,
    and the next call reconnects instead of failing with "Connection closed
    by server"."""
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        async with LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), timeout=1.0) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            assert (await lsh.query(BASE[3], top_k=1))[0].id == 3
            server.executor.stop()
            await restart(server)
            assert (await lsh.query(BASE[4], top_k=1))[0].id == 4
            await lsh.delete([4])
            assert await lsh.count() == 499


async def test_stopped_postgres_surfaces_the_store_error(redis_proc: Any) -> None:
    url = f"redis://{redis_proc.host}:{redis_proc.port}/4"
    with postgres() as server:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, embedding bytea)")
        await conn.executemany("INSERT INTO t VALUES ($1, $2)", [(i, BASE[i].tobytes()) for i in range(300)])
        await conn.close()
        store = PostgresStore(server.url, table="t", command_timeout=3.0)
        async with LSHRS(dim=DIM, redis_url=url, prefix="pgdown", store=store) as lsh:
            await lsh.drop()
            await lsh.index()
            assert (await lsh.query(BASE[1], top_k=1))[0].id == 1
            server.executor.stop()
            started = time.monotonic()
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await lsh.query(BASE[1], top_k=1)
            assert time.monotonic() - started < 10


async def test_acl_user_and_password() -> None:
    acl = ["--user", "default", "off", "--user", "app", "on", ">s3cret", "~*", "&*", "+@all"]
    with redis_server(*acl) as server:
        url = server.url.replace("redis://", "redis://app:s3cret@")
        async with LSHRS(dim=DIM, redis_url=url, store=InMemoryStore()) as lsh:
            await lsh.index(np.arange(300), BASE[:300])
            assert (await lsh.query(BASE[7], top_k=1))[0].id == 7
        with pytest.raises(redis.exceptions.AuthenticationError):
            await LSHRS(dim=DIM, redis_url=url.replace("s3cret", "wrong")).open()
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            await LSHRS(dim=DIM, redis_url=server.url).open()  # the default user is disabled


async def test_tls_only_server(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    import port_for

    port = int(port_for.select_random())
    tls = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert_file), "--tls-key-file",
           str(key_file), "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"]  # fmt: skip
    with redis_server(*tls, port=port):
        url = f"rediss://127.0.0.1:{port}/0"
        async with LSHRS(dim=DIM, redis_url=url, redis_options={"ssl_ca_certs": str(ca_file)},
                         store=InMemoryStore()) as lsh:  # fmt: skip
            await lsh.index(np.arange(300), BASE[:300])
            assert (await lsh.query(BASE[8], top_k=1))[0].id == 8
        with pytest.raises(redis.exceptions.ConnectionError):  # an unknown authority is refused
            await LSHRS(dim=DIM, redis_url=url, timeout=2.0).open()


async def test_cancelled_build_leaves_only_whole_ids(make_lsh: Any, raw_redis: Any) -> None:
    lsh = await make_lsh(batch_size=500)
    with anyio.move_on_after(0.3) as scope:
        await lsh.index(np.arange(6000), BASE)
    state = await index_state(raw_redis, lsh)  # checks bucket/signature agreement id by id
    assert scope.cancelled_caught or len(state) == 6000
    assert set(state) <= set(range(6000))
    assert await lsh.index(np.arange(6000), BASE) == 6000  # and a re-run completes it
    assert len(await index_state(raw_redis, lsh)) == 6000


async def test_cancelled_query_writes_nothing(make_lsh: Any, raw_redis: Any) -> None:
    from conftest import keyspace

    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(2000), BASE[:2000])
    before = await keyspace(raw_redis)
    with anyio.move_on_after(0.001):
        await lsh.query_many(BASE[:200])
    assert await keyspace(raw_redis) == before
    assert (await lsh.query(BASE[0], top_k=1))[0].id == 0


def test_no_pickle_or_eval_in_the_package() -> None:
    """Stored bytes are only ever JSON, float32 and int64: nothing in Redis can run code."""
    unsafe_modules = {"pickle", "cPickle", "dill", "marshal", "shelve"}
    unsafe_calls = {"eval", "exec"}
    source = Path(__file__).resolve().parents[1] / "src" / "lshrs"
    for path in source.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
                assert not imported & unsafe_modules, (path, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in unsafe_modules, (
                    path,
                    node.lineno,
                )
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in unsafe_calls, (path, node.lineno)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                # Raw EVAL of a string built at run time; scripts go through
                # register_script (a cluster pipeline sends one by its ``.sha``).
                assert node.func.attr not in {"eval", "evalsha"}, (path, node.lineno)
                if node.func.attr == "execute_command" and isinstance(node.args[0], ast.Constant):
                    assert node.args[0].value != "EVAL", (path, node.lineno)
                    if node.args[0].value == "EVALSHA":
                        sha = node.args[1]
                        assert isinstance(sha, ast.Attribute) and sha.attr == "sha", (path, node.lineno)


async def test_a_release_that_failed_is_retried_until_it_lands() -> None:
    """Leases a failed write leaves behind are released in the background; a
    release that meets a server that is down (a failover, a restart) is tried
    again until it lands, instead of leaving the ids locked for the leases'
    30 s, where the next write of them (a retry, a reconcile) would time out."""
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        async with LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), prefix="rel", timeout=1.0) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            index = lsh._opened.sharded  # type: ignore[union-attr]
            assert await index.lease(np.arange(3), b"cut", 30_000)  # a write's leases, then the write failed
            server.executor.stop()
            lsh._release_later(index, np.arange(3), b"cut")
            await anyio.sleep(0.5)  # the first release fails: nothing answers
            await restart(server)
            started = time.monotonic()
            await lsh.ingest(1, BASE[1] + 0.5)  # waits for the lease at most its 1 s timeout
            assert time.monotonic() - started < 1.0


async def test_close_lets_pending_releases_land_for_a_second_then_cancels_them() -> None:
    """A client closed while a release retries against a server that is down
    waits about a second for it, then cancels it: not the leases' 30 s."""
    with redis_server() as server:
        lsh = LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), prefix="rel", timeout=0.2)
        await lsh.index(np.arange(500), BASE[:500])
        index = lsh._opened.sharded  # type: ignore[union-attr]
        server.executor.stop()
        lsh._release_later(index, np.arange(3), b"cut")
        pending = set(lsh._releasing)
        started = time.monotonic()
        await lsh.close()
        waited = time.monotonic() - started
        await asyncio.wait(pending, timeout=1.0)  # a cancelled task ends at its next step
        assert pending and all(task.cancelled() for task in pending)
        assert 0.9 < waited < 5.0, waited


async def test_a_release_that_cannot_land_gives_up_once_its_leases_lapse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the leases' lapse the server frees the ids itself: a release still
    retrying against a server that stays down would only spin."""
    import lshrs._lshrs as lshrs_module

    monkeypatch.setattr(lshrs_module, "_LEASE_MS", 400)
    with redis_server() as server:
        async with LSHRS(dim=DIM, redis_url=server.url, store=InMemoryStore(), prefix="rel", timeout=0.2) as lsh:
            await lsh.index(np.arange(500), BASE[:500])
            index = lsh._opened.sharded  # type: ignore[union-attr]
            server.executor.stop()
            lsh._release_later(index, np.arange(3), b"cut")
            _, retrying = await asyncio.wait(set(lsh._releasing), timeout=5)
            assert not retrying
            await restart(server)


class _ReleaseFailing:
    """The one method ``_release_until_done`` calls, failing its first
    ``failures`` calls as a server that is down would; it records when each
    came. The timing of the retries is the unit here, so no server: the two
    tests above run the retry against a real one that is stopped."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def release(self, ids: Any, token: bytes) -> None:
        self.calls.append(asyncio.get_running_loop().time())
        if len(self.calls) <= self.failures:
            raise redis.exceptions.ConnectionError("down")


async def test_a_failed_release_is_retried_after_pauses_that_double_up_to_a_second() -> None:
    from lshrs._lshrs import _release_until_done

    index = _ReleaseFailing(failures=6)
    await _release_until_done(index, np.arange(3), b"cut")  # type: ignore[arg-type]
    gaps = np.diff(index.calls)
    assert len(gaps) == 6
    pauses = np.array([0.05, 0.1, 0.2, 0.4, 0.8, 1.0])
    assert np.all(gaps > pauses - 0.005), gaps
    assert np.all(gaps < 1.4 * pauses + 0.05), gaps  # a loaded machine's lag, not a third of a pause


async def test_a_release_gives_up_before_a_pause_would_pass_the_leases_lapse(monkeypatch: pytest.MonkeyPatch) -> None:
    import lshrs._lshrs as lshrs_module

    monkeypatch.setattr(lshrs_module, "_LEASE_MS", 1500)
    index = _ReleaseFailing(failures=100)
    started = asyncio.get_running_loop().time()
    with pytest.raises(redis.exceptions.ConnectionError):
        await lshrs_module._release_until_done(index, np.arange(3), b"cut")  # type: ignore[arg-type]
    # Pauses of 0.05, 0.1, 0.2 and 0.4 s; the next, 0.8, would end past 1.5 s.
    assert len(index.calls) == 5
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_a_reconcile_waits_out_a_lease_that_an_ingest_gives_up_on(redis_url: str, raw_redis: Any) -> None:
    """A lease nobody will release (its client crashed, or a failover kept the
    lease and lost the release) holds its id until it lapses. An ingest has a
    deadline and fails at it; a reconcile, the repair to run after such a
    failure, waits for the lapse instead of failing on the client's timeout,
    and so does a build, from the store or of given arrays."""
    async with LSHRS(dim=DIM, redis_url=redis_url, store=InMemoryStore(), prefix="orphan", timeout=0.5) as lsh:
        await lsh.index(np.arange(1000), BASE[:1000])
        index = lsh._opened.sharded  # type: ignore[union-attr]
        orphan = np.array([7])
        lapses_ms = int(time.time() * 1000) + 2500
        await raw_redis.hset(index.lease_key(int(index.shard_of(orphan)[0])), packed_id(7), f"{lapses_ms}:gone")
        with pytest.raises(TimeoutError, match=r"^another client kept writing some of these ids"):
            await lsh.ingest(7, BASE[7] + 0.5)  # the id stays held past the call's deadline
        started = time.monotonic()
        report = await lsh.reconcile()
        assert time.monotonic() - started > 1.0, "the reconcile did not wait for the lease"
        assert (report.added, report.removed, report.unchanged) == (0, 0, 1000)
        await lsh.ingest(7, BASE[7] + 0.5)  # lapsed: writable again
        assert set(await index_state(raw_redis, lsh)) == set(range(1000))
        # A build from the store is a repair too: it waits as long.
        lapses_ms = int(time.time() * 1000) + 2500
        await raw_redis.hset(index.lease_key(int(index.shard_of(orphan)[0])), packed_id(7), f"{lapses_ms}:gone")
        started = time.monotonic()
        assert await lsh.index() == 1000
        assert time.monotonic() - started > 1.0, "the build did not wait for the lease"
        # And so does a build of given arrays: index(), not an ingest.
        lapses_ms = int(time.time() * 1000) + 2500
        await raw_redis.hset(index.lease_key(int(index.shard_of(orphan)[0])), packed_id(7), f"{lapses_ms}:gone")
        started = time.monotonic()
        assert await lsh.index(np.arange(1000), BASE[:1000]) == 1000
        assert time.monotonic() - started > 1.0, "the build did not wait for the lease"


async def test_a_write_waits_for_a_held_lease_as_long_as_its_own_timeout_allows(redis_url: str, raw_redis: Any) -> None:
    """A lease held elsewhere delays an ingest or a delete up to the call's
    deadline: a ``timeout=`` longer than the client's is waited out in full,
    and a call that gives up says that the ids were held, not merely that
    time ran out."""
    async with LSHRS(dim=DIM, redis_url=redis_url, store=InMemoryStore(), prefix="held", timeout=0.5) as lsh:
        await lsh.index(np.arange(500), BASE[:500])
        index = lsh._opened.sharded  # type: ignore[union-attr]

        async def hold(id_: int, seconds: float) -> None:
            lapses_ms = int((time.time() + seconds) * 1000)
            key = index.lease_key(int(index.shard_of(np.array([id_]))[0]))
            await raw_redis.hset(key, packed_id(id_), f"{lapses_ms}:elsewhere")

        # The lease lapses 1.5 s after `held`, which is read before the HSET
        # (the cluster client's first command to a node can take a while).
        held = time.monotonic()
        await hold(7, 1.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"^another client kept writing some of these ids for 0\.[345] s"):
            await lsh.ingest(7, BASE[7] + 0.5, timeout=0.5)
        assert time.monotonic() - started < 0.5
        await lsh.ingest(7, BASE[7] + 0.5, timeout=3.0)  # the lease lapses at 1.5 s, within this call's 3 s
        assert time.monotonic() - held > 1.45
        assert (await lsh.query(BASE[7] + 0.5, top_k=1))[0].id == 7

        held = time.monotonic()
        await hold(9, 1.5)
        assert await lsh.delete([9], timeout=3.0) == 1
        assert time.monotonic() - held > 1.45
        assert 9 not in set(await index_state(raw_redis, lsh))
