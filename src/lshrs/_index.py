"""The Redis side of the index: key layout, sharding, and the scripts that write
and read it. Knows nothing of vectors; it moves ids and packed signatures."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, SlotNotCoveredError

from . import _scripts
from ._cache import SignatureCache, WriteChain
from ._config import MAX_SHORT_ID
from ._family import Layout
from ._types import ProgressCallback

Client = Redis | RedisCluster
IdArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]

T = TypeVar("T")

logger = logging.getLogger("lshrs")

#: Ids per script call: keeps each atomic step short so other clients are not
#: stalled behind a long script.
WRITE_CHUNK = 500

#: Queries whose bucket reads share one pipeline (and one in-flight slot):
#: enough to spread a round trip's fixed cost, few enough that the client
#: ranks one chunk's candidates while Redis reads the next.
PIPELINED_QUERIES = 16

#: A shard is warmed in the background at most once in this many seconds.
REWARM_SECONDS = 60.0


@dataclass(frozen=True)
class Candidates:
    ids: IdArray
    signatures: ByteArray  # (n, signature_bytes)

    def only(self, keep: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> Candidates:
        """The candidates a mask keeps, or those at the given positions, in their order."""
        return Candidates(self.ids[keep], self.signatures[keep])

    def plus(self, more: Candidates) -> Candidates:
        """These and ``more``, each id once (banded buckets name an id in
        several tables)."""
        ids = np.concatenate([self.ids, more.ids])
        _, first = np.unique(ids, return_index=True)
        return Candidates(ids[first], np.concatenate([self.signatures, more.signatures])[first])


def meta_keys(prefix: str) -> tuple[str, str]:
    """Configuration and projection keys; one hash tag, so one script sees both."""
    return f"{{{prefix}}}:cfg", f"{{{prefix}}}:proj"


def centroids_key(prefix: str) -> str:
    """The learned family's partition (``_partition.Partition.to_bytes``), beside the configuration."""
    return f"{{{prefix}}}:cent"


def tuning_key(prefix: str) -> str:
    """The saved result of ``LSHRS.tune()``: JSON, beside the configuration."""
    return f"{{{prefix}}}:tune"


async def together(calls: Sequence[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, except that the first failure cancels the other
    calls and waits for them to end. With plain ``gather`` they run on, and
    redis-py's retries can land a failed build's remaining scripts after a
    reconnect, when its caller has already been told it failed. Each script is
    atomic, so a cancelled one either ran or did not."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        await cancelled(tasks)
        raise


async def cancelled(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended, whatever it raised."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ShardedIndex:
    """Ids spread over ``shards`` key groups; each group is one hash tag, hence
    one cluster slot, so per-shard scripts are atomic and run on one node."""

    def __init__(
        self,
        client: Client,
        prefix: str,
        shards: int,
        layout: Layout,
        cache_size: int,
        max_in_flight: int = 64,
        warm_in_background: bool = True,
    ) -> None:
        self._client = client
        self._cache = SignatureCache(shards, layout.record_bytes, cache_size)
        self._warm_in_background = warm_in_background and cache_size > 0
        self._warming: dict[int, asyncio.Task[None]] = {}
        self._warm_started: dict[int, float] = {}
        self._first_named = FirstNamed(self.reported_size)
        # Bounds the calls in flight, so thousands of concurrent tasks queue here
        # instead of exhausting the client's connection pool. Writes have their
        # own, smaller budget: queued behind thousands of reads in one line, an
        # insert would wait for all of them.
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._writes_in_flight = asyncio.Semaphore(max(1, max_in_flight // 8))
        self._prefix = prefix
        self._shards = shards
        self._layout = layout
        # 0: one record hash a shard. A grouped layout learns its group count
        # with the partition (``use_groups``); until then it holds no records.
        self.groups = 0
        self._upsert = client.register_script(_scripts.UPSERT)
        self._delete = client.register_script(_scripts.DELETE)
        self._query = client.register_script(_scripts.QUERY)
        self._changes = client.register_script(_scripts.CHANGES)
        self._lease = client.register_script(_scripts.LEASE)
        self._release = client.register_script(_scripts.RELEASE)
        self._repair = client.register_script(_scripts.REPAIR)
        self._strays = client.register_script(_scripts.STRAYS)
        self._held = client.register_script(_scripts.HELD)
        self._compact = client.register_script(_scripts.COMPACT)
        self._recount = client.register_script(_scripts.RECOUNT)
        self._bucket_sizes = client.register_script(_scripts.BUCKET_SIZES)

    def use_groups(self, trained_for: int) -> None:
        """Size a grouped layout's record groups for the vectors its
        partition was fitted for (every client derives the same count)."""
        if self._layout.grouped:
            self.groups = groups_for(trained_for, self._shards)

    def signature_key(self, shard: int) -> str:
        """The shard's record hash, or the stem of its record groups' keys."""
        return f"{{{self._prefix}:{shard}}}:s"

    def record_keys(self, shard: int, ids: IdArray) -> list[str]:
        """The key holding each id's record (``_scripts._RECORD_KEY``)."""
        stem = self.signature_key(shard)
        if not self.groups:
            return [stem] * len(ids)
        return [f"{stem}:{g}" for g in group_of(ids, self.groups).tolist()]

    def _group_keys(self, shard: int) -> list[str]:
        """The record hashes of a grouped shard (an ungrouped one has one, ``signature_key``)."""
        stem = self.signature_key(shard)
        return [f"{stem}:{g}" for g in range(self.groups)]

    def script_keys(self, shard: int) -> list[str]:
        """The record hash, the generation counter, the change log and the id count of a shard."""
        tag = f"{{{self._prefix}:{shard}}}"
        return [self.signature_key(shard), f"{tag}:g", f"{tag}:l", f"{tag}:n"]

    def _signature_rows(self, packed: bytes) -> ByteArray:
        """Concatenated signatures as one (n, signature_bytes) array, no copy."""
        return np.frombuffer(packed, np.uint8).reshape(-1, self._layout.record_bytes)

    def bucket_base(self, shard: int) -> bytes:
        return f"{{{self._prefix}:{shard}}}:b".encode()

    def shard_of(self, ids: IdArray) -> npt.NDArray[np.int64]:
        return np.mod(ids, self._shards)

    def _static_args(self, shard: int) -> list[Any]:
        return [self.bucket_base(shard), self._layout.key_bytes, self._layout.tables, self.groups, self.id_bytes]

    @property
    def id_bytes(self) -> int:
        """Bytes of an id as a bucket entry and a record field."""
        return self._layout.id_bytes

    @property
    def tables(self) -> int:
        """Buckets an id is filed in: its bands, or its learned bucket and spill."""
        return self._layout.tables

    def fits(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Which ``ids`` this index can hold. One that does not fit is in no
        bucket; cut to 4 bytes it would name another id, so deletes and
        lookups leave it out."""
        if self.id_bytes == 8:
            return np.ones(len(ids), bool)
        return (ids >= 0) & (ids <= MAX_SHORT_ID)

    def _ids(self, packed: bytes) -> IdArray:
        """Ids as buckets and record fields hold them, concatenated."""
        return parse_ids(packed, self.id_bytes)

    def _chunks(self, ids: IdArray) -> list[tuple[int, npt.NDArray[np.intp]]]:
        """Rows of ``ids`` by shard, at most ``WRITE_CHUNK`` a chunk."""
        shard_of = self.shard_of(ids)
        chunks = []
        for shard in range(self._shards):
            rows = np.flatnonzero(shard_of == shard)
            chunks += [(shard, rows[start : start + WRITE_CHUNK]) for start in range(0, len(rows), WRITE_CHUNK)]
        return chunks

    async def _per_shard(self, ids: IdArray, script: Any) -> int:
        """Run ``script`` over ``ids`` in chunks, shards concurrently."""
        calls = [
            self._write(script, self.script_keys(shard), [*self._static_args(shard), *map(packed_id, ids[chunk])])
            for shard, chunk in self._chunks(ids)
        ]
        return sum(int(r) for r in await together(calls))

    def _record_calls(
        self, script: Any, ids: IdArray, signatures: ByteArray, chunks: Sequence[tuple[int, IdArray]] | None = None
    ) -> list[Any]:
        """``script`` over ``ids`` and their records in chunks, two blobs a
        chunk (``_scripts._RECORDS``), not yet awaited."""
        return [
            self._write(
                script,
                self.script_keys(shard),
                [*self._static_args(shard), ids[chunk].astype("<i8").tobytes(), signatures[chunk].tobytes()],
            )
            for shard, chunk in (self._chunks(ids) if chunks is None else chunks)
        ]

    def _cache_records(self, ids: IdArray, signatures: ByteArray, chain: WriteChain | None = None) -> None:
        shard_of = self.shard_of(ids)
        for shard in range(self._shards):
            rows = shard_of == shard
            added = self._cache.add(shard, ids[rows], signatures[rows])
            if chain is not None:
                chain.cached(shard, added)

    def lease_key(self, shard: int) -> str:
        return f"{{{self._prefix}:{shard}}}:k"

    async def lease(self, ids: IdArray, token: bytes, lifetime_ms: int) -> bool:
        """Lease every id to ``token``, or none (``_scripts.LEASE``): a chunk
        refused because another writer holds one of its ids releases the
        chunks that were granted, so two writers never wait on each other."""
        calls = [
            self._write(self._lease, [self.lease_key(shard)], [token, lifetime_ms, *(packed_id(ids[r]) for r in chunk)])
            for shard, chunk in self._chunks(ids)
        ]
        granted = await together(calls)
        if all(int(g) for g in granted):
            return True
        await self.release(ids, token)
        return False

    async def release(self, ids: IdArray, token: bytes) -> None:
        await together(
            [
                self._write(self._release, [self.lease_key(shard)], [token, *(packed_id(ids[r]) for r in chunk)])
                for shard, chunk in self._chunks(ids)
            ]
        )

    async def _write(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        async with self._writes_in_flight:
            return await script(keys=keys, args=args)

    def begin_writes(self) -> WriteChain:
        """Start a write whose replies may let the cache claim a generation (:class:`WriteChain`)."""
        return self._cache.begin()

    def end_writes(self, chain: WriteChain) -> None:
        self._cache.claim(chain)

    async def upsert(self, ids: IdArray, signatures: ByteArray, chain: WriteChain | None = None) -> None:
        """Insert or replace (an id whose record is the same is not written)."""
        chunks = self._chunks(ids)
        replies = await together(self._record_calls(self._upsert, ids, signatures, chunks))
        for (shard, _), (logged, generation, size) in zip(chunks, replies):
            if chain is not None:
                chain.scripted(shard, int(logged), int(generation), int(size))
        self._cache_records(ids, signatures, chain)

    async def repair(self, ids: IdArray, signatures: ByteArray) -> npt.NDArray[np.int64]:
        """Reconcile ``ids`` with records computed afresh (``_scripts.REPAIR``):
        counts of added, updated, unchanged and repaired ids."""
        counts = np.zeros(4, dtype=np.int64)
        for reply in await together(self._record_calls(self._repair, ids, signatures)):
            counts += np.asarray(reply, dtype=np.int64)
        self._cache_records(ids, signatures)
        return counts

    async def held(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Which ``ids`` have a record (``_scripts.HELD``)."""
        fits = self.fits(ids)
        if not fits.all():
            out = np.zeros(len(ids), dtype=bool)
            out[fits] = await self.held(ids[fits])
            return out
        chunks = self._chunks(ids)
        replies = await asyncio.gather(
            *(
                self._held(
                    keys=[self.signature_key(s)], args=[ids[rows].astype("<i8").tobytes(), self.groups, self.id_bytes]
                )
                for s, rows in chunks
            )
        )
        out = np.zeros(len(ids), dtype=bool)
        for (_, rows), reply in zip(chunks, replies):
            out[rows] = np.frombuffer(reply, np.uint8) == ord("1")
        return out

    async def indexed_ids(self) -> IdArray:
        """Every id with a record."""
        found: list[bytes] = []
        for shard in range(self._shards):
            async for ids, _ in self._record_batches(shard, 10_000):
                found.append(ids)
        return self._ids(b"".join(found))

    async def _record_batches(self, shard: int, batch: int) -> AsyncIterator[tuple[bytes, bytes]]:
        """A shard's (ids, records), each concatenated, about ``batch`` at a
        time: HSCAN of one record hash (no blocking HGETALL of a large one), or
        HGETALL of its record groups, pipelined."""
        if not self.groups:
            ids: list[bytes] = []
            records: list[bytes] = []
            async for id_, record in self._client.hscan_iter(self.signature_key(shard), count=batch):
                ids.append(id_)
                records.append(record)
                if len(ids) == batch:
                    yield b"".join(ids), b"".join(records)
                    ids, records = [], []
            if ids:
                yield b"".join(ids), b"".join(records)
            return
        keys = self._group_keys(shard)
        step = max(1, batch // RECORDS_PER_GROUP)
        for start in range(0, len(keys), step):
            pipe = self._client.pipeline(transaction=False)
            for key in keys[start : start + step]:
                pipe.hgetall(key)
            groups = await pipe.execute()
            yield b"".join(i for g in groups for i in g), b"".join(r for g in groups for r in g.values())

    async def remove_strays(self) -> int:
        """Remove bucket entries no record names (``_scripts.STRAYS``), shard by
        shard, over the bucket keys a scan finds; returns how many."""
        removed = 0
        for shard in range(self._shards):
            base = self.bucket_base(shard)
            keys = await self._bucket_keys(shard)
            for start in range(0, len(keys), WRITE_CHUNK):
                args = [base, self._layout.key_bytes, self.groups, self.id_bytes, *keys[start : start + WRITE_CHUNK]]
                removed += int(await self._write(self._strays, [self.signature_key(shard)], args))
        return removed

    async def compact(self) -> None:
        """Rewrite every bucket at its exact size. APPEND allocates ahead of a
        string's length, so a bulk build leaves slack in every bucket (4 of
        the 17 B a vector of buckets at 1M); a script rewrites a key between
        two writes, so no concurrent append is lost."""
        for shard in range(self._shards):
            keys = await self._bucket_keys(shard)
            chunks = (keys[start : start + WRITE_CHUNK] for start in range(0, len(keys), WRITE_CHUNK))
            await together([self._write(self._compact, [self.signature_key(shard)], c) for c in chunks])

    async def recount(self) -> None:
        """Set each grouped shard's id count to the records it holds (``_scripts.RECOUNT``)."""
        if self.groups:
            await together(
                [self._write(self._recount, self.script_keys(s), [self.groups]) for s in range(self._shards)]
            )

    async def _bucket_keys(self, shard: int) -> list[bytes]:
        return [key async for key in self._client.scan_iter(match=self.bucket_base(shard) + b"*", count=1000)]

    async def delete(self, ids: IdArray) -> int:
        """Remove every bucket membership and the signature; returns how many existed."""
        return await self._per_shard(ids[self.fits(ids)], self._delete)

    @property
    def probe_key_width(self) -> int:
        """Bytes of one bucket suffix in a plan: the table byte, then the key."""
        return 1 + self._layout.key_bytes

    async def candidates(self, plans: Sequence[bytes], caps: Sequence[int]) -> list[Candidates]:
        """Each query's ids in its probed buckets (a plan: fixed-width bucket
        suffixes, concatenated) with their signatures, at most its cap; all
        shards at once. A shard this client's cache holds is read for
        ``PIPELINED_QUERIES`` queries a round trip, by plain MGETs; one it
        does not hold yet, by one script a query, which also returns the
        signatures. A second round trip only for signatures not cached."""
        found = await together([self._shard_candidates(s, plans, caps) for s in range(self._shards)])
        if self._shards == 1:
            return found[0]
        return [
            Candidates(np.concatenate([f[q].ids for f in found]), np.concatenate([f[q].signatures for f in found]))
            for q in range(len(plans))
        ]

    async def _shard_candidates(self, shard: int, plans: Sequence[bytes], caps: Sequence[int]) -> list[Candidates]:
        if not self._cache.is_warm(shard):
            self._warm_later(shard)
            return await together([self._cold_candidates(shard, plan, cap) for plan, cap in zip(plans, caps)])
        spans = [
            range(start, min(start + PIPELINED_QUERIES, len(plans)))
            for start in range(0, len(plans), PIPELINED_QUERIES)
        ]
        found = await together(
            [self._warm_candidates(shard, [plans[q] for q in span], [caps[q] for q in span]) for span in spans]
        )
        return [candidates for chunk in found for candidates in chunk]

    # Each holds one slot (a warm one for up to PIPELINED_QUERIES queries)
    # for both its round trips: a query that holds thousands of candidates
    # must not queue again behind every other waiting query, or memory grows
    # with the queue (measured: 17 GB at 10,000 in flight).

    async def _cold_candidates(self, shard: int, plan: bytes, cap: int) -> Candidates:
        if not plan:
            return self._no_candidates()
        async with self._in_flight:
            known = self._cache.generation(shard)
            args: list[bytes | int] = [
                self.bucket_base(shard),
                self.probe_key_width,
                plan,
                -1 if known is None else known,
                cap,
                self.groups,
                self.id_bytes,
            ]
            generation, size, buckets, changed, covered, ids, records = await self._query(
                keys=self.script_keys(shard), args=args
            )
            self._observe(shard, known, generation, size, changed, covered)
            if ids:  # the script read these in the same atomic step as the buckets
                self._cache.add_read(shard, int(generation), self._ids(ids), self._signature_rows(records))
            return await self._signed(shard, buckets, cap)

    async def _warm_candidates(self, shard: int, plans: Sequence[bytes], caps: Sequence[int]) -> list[Candidates]:
        async with self._in_flight:
            known = self._cache.generation(shard)
            try:
                reply = await self._read_buckets(shard, plans, known)
            except NoScriptError:  # a server restarted, or a node promoted, since this client loaded it
                await self._client.script_load(_scripts.CHANGES)
                reply = await self._read_buckets(shard, plans, known)
            generation, size, changed, covered = reply[0]
            self._observe(shard, known, generation, size, changed, covered)
            read = iter(reply[1:])
            return [
                await self._signed(shard, [b for b in next(read) if b is not None], cap)
                if plan
                else self._no_candidates()
                for plan, cap in zip(plans, caps)
            ]

    async def _read_buckets(self, shard: int, plans: Sequence[bytes], known: int | None) -> list[Any]:
        """The change log (``_scripts.CHANGES``), then each non-empty plan's buckets: one round trip."""
        base, width = self.bucket_base(shard), self.probe_key_width
        pipe = self._client.pipeline(transaction=False)
        keys = self.script_keys(shard)
        route = self._route(keys[0])
        # By name: a cluster pipeline refuses .evalsha() and .mget(), whose
        # keys could span slots; these share the shard's one.
        known_arg = -1 if known is None else known
        pipe.execute_command("EVALSHA", self._changes.sha, 4, *keys, known_arg, self.groups, **route)
        for plan in plans:
            if plan:
                buckets = [base + key for key in plan_keys(plan, width)]
                pipe.execute_command("MGET", *buckets, **route)
        return list(await pipe.execute())

    def _route(self, key: str) -> dict[str, Any]:
        """The node of ``key``'s slot, for a cluster pipeline's commands:
        unnamed, it hashes every key of an MGET to check that they share a
        slot (0.27 ms for 198 buckets, measured ad hoc). A MOVED reply is
        still followed."""
        if not isinstance(self._client, RedisCluster):
            return {}
        try:
            return {"target_nodes": self._client.get_node_from_key(key)}
        except SlotNotCoveredError:  # mid-failover: let redis-py find the node
            return {}

    def _observe(self, shard: int, known: int | None, generation: int, size: int, changed: bytes, covered: int) -> None:
        self._cache.observe(shard, int(generation), int(size), known, parse_ids(changed, 8) if covered else None)

    def _no_candidates(self) -> Candidates:
        return Candidates(np.empty(0, np.int64), np.empty((0, self._layout.record_bytes), np.uint8))

    async def _signed(self, shard: int, buckets: Sequence[bytes], cap: int) -> Candidates:
        """The ids of ``buckets`` (best first), at most ``cap``, with their
        signatures from the cache, or fetched."""
        if self._layout.tables == 1:
            ids = nearest_buckets(buckets, cap, self.id_bytes)
        elif self._layout.ranked:  # spilled: an id's first bucket read ranks it
            ids = nearest_buckets(buckets, cap, self.id_bytes, self._first_named)
        else:
            ids, hits = count_ids(self._ids(b"".join(buckets)))
            if len(ids) > cap:
                ids = most_named(ids, hits, cap)
        signatures, missing = self._cache.lookup(shard, ids)
        if not missing.any():
            return Candidates(ids, signatures)
        generation, fetched = await self._fetch_records(shard, ids[missing])
        # An id deleted since the bucket read has no signature any more: drop it.
        present = np.array([sig is not None for sig in fetched], dtype=bool)
        rows = np.flatnonzero(missing)[present]
        if len(rows):
            signatures[rows] = self._signature_rows(b"".join(s for s in fetched if isinstance(s, bytes)))
            self._cache.add_read(shard, generation, ids[rows], signatures[rows])
        keep = ~missing
        keep[rows] = True
        return Candidates(ids[keep], signatures[keep])

    async def _fetch_records(self, shard: int, ids: IdArray) -> tuple[int, list[bytes | None]]:
        """The shard's generation, then the records of ``ids`` (None: no
        record), in one round trip: read after that generation, the records
        hold every write it counts (:meth:`SignatureCache.add_read`)."""
        fields = [packed_id(i)[: self.id_bytes] for i in ids]
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self.script_keys(shard)[1])
        if not self.groups:
            pipe.hmget(self.signature_key(shard), fields)
        else:
            for key, field in zip(self.record_keys(shard, ids), fields):
                pipe.hget(key, field)
        generation, *replies = await pipe.execute()
        records = replies[0] if not self.groups else replies
        return int(generation or 0), [r if isinstance(r, bytes) else None for r in records]

    def reported_size(self) -> int:
        """Ids in the index as the query scripts last reported them (each
        reply carries its shard's size): free, and current after any query."""
        return self._cache.indexed()

    async def warm(self, batch: int = 10_000) -> int:
        """Load every stored signature into the cache (an HSCAN per shard), so
        that queries read only bucket ids from Redis. Returns how many were cached."""
        loaded = 0
        for shard in range(self._shards):
            loaded += await self.warm_shard(shard, batch)
        return loaded

    async def warm_shard(self, shard: int, batch: int = 10_000) -> int:
        """Scan a shard's records aside, then cache them as current as the
        change log makes them. Queries and writes go on meanwhile: a record
        scanned before a write to it is stale, so every id the log names
        since the scan began is left out, and the records are cached only
        once they are at least as current as the generation the cache claims
        (a query's reply may have moved it past the scan's end, evicting a
        write these records predate). Returns how many were cached."""
        keys = self.script_keys(shard)
        known = int(await self._client.get(keys[1]) or 0)  # before the scan: it holds every write this counts
        id_parts: list[bytes] = []
        record_parts: list[bytes] = []
        async for packed_ids, packed_records in self._record_batches(shard, batch):
            id_parts.append(packed_ids)
            record_parts.append(packed_records)
        ids, signatures = self._ids(b"".join(id_parts)), self._signature_rows(b"".join(record_parts))
        while True:
            reply = await self._changes(keys=keys, args=[known, self.groups])
            generation, size, changed, covered = int(reply[0]), int(reply[1]), reply[2], int(reply[3])
            if not covered:  # more writes than the log keeps: queries fill the cache instead
                return 0
            if changed:
                current = ~np.isin(ids, parse_ids(changed, 8))
                ids, signatures = ids[current], signatures[current]
            known = generation
            claimed = self._cache.generation(shard)
            if claimed is None or claimed <= known:
                break
        self._cache.reset(shard, known, size)
        return self._cache.add(shard, ids, signatures)

    def _warm_later(self, shard: int) -> None:
        """Warm a cold shard in the background: until its cache holds most
        of it, each query reads its candidates' records too (at 1M, timed ad
        hoc: 47 ms a cold query, 5 a warm one; a restarted service that
        forgot ``warm()`` was still cold after 300 queries). One warm a shard at
        a time, at most one a ``REWARM_SECONDS``, so writes that keep
        outrunning the change log do not keep it scanning."""
        if not self._warm_in_background or shard in self._warming:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._warm_started.get(shard, -math.inf) < REWARM_SECONDS:
            return
        self._warm_started[shard] = loop.time()
        task = loop.create_task(self._warm_quietly(shard))
        self._warming[shard] = task
        task.add_done_callback(lambda _: self._warming.pop(shard, None))

    async def _warm_quietly(self, shard: int) -> None:
        """A background warm that fails leaves the cache cold, nothing more:
        the queries meanwhile meet the same failure and raise it themselves."""
        try:
            await self.warm_shard(shard)
        except Exception as error:
            logger.debug("background warm of shard %d failed: %r", shard, error)

    async def stop_warming(self) -> None:
        """Cancel the background warms, before the client closes."""
        await cancelled(list(self._warming.values()))

    async def centroids(self) -> bytes | None:
        raw = await self._client.get(centroids_key(self._prefix))
        return raw if isinstance(raw, bytes) else None

    async def save_centroids(self, blob: bytes) -> bytes:
        """Store a partition unless one is there; returns the stored one, so
        clients that trained at once all adopt the first."""
        before = await self._client.set(centroids_key(self._prefix), blob, nx=True, get=True)
        return before if isinstance(before, bytes) else blob

    async def bucket_sample(
        self, most: int | None, report: ProgressCallback | None = None
    ) -> tuple[list[int], list[int], bool]:
        """Sizes (ids) and memory (bytes, ``MEMORY USAGE``) of bucket keys
        found by scanning, at most ``most`` of them (None: all), and whether
        the scan saw every bucket. Scan order follows the key hashes, so a
        partial scan is a fair sample. One script per 1,000 keys, sent as the
        scan finds them; ``report`` gets the keys read so far after each."""
        sizes: list[int] = []
        memory: list[int] = []
        complete = True
        per_shard = None if most is None else -(-most // self._shards)

        async def measure(shard: int, keys: list[bytes]) -> None:
            replies = await self._bucket_sizes(keys=[self.signature_key(shard)], args=keys)
            sizes.extend(int(length) // self.id_bytes for length in replies[0::2])
            memory.extend(int(used) for used in replies[1::2])
            if report:
                report(len(sizes), None)

        for shard in range(self._shards):
            keys: list[bytes] = []
            taken = 0
            async for key in self._client.scan_iter(match=self.bucket_base(shard) + b"*", count=1000):
                keys.append(key)
                taken += 1
                if len(keys) == 1000:
                    await measure(shard, keys)
                    keys = []
                if per_shard is not None and taken >= per_shard:
                    complete = False
                    break
            if keys:
                await measure(shard, keys)
        return sizes, memory, complete

    async def meta_memory(self) -> int:
        """Bytes of every key but the buckets: records, change logs, counters,
        configuration, projection, partition, tuning (``MEMORY USAGE``)."""
        tag = f"{{{self._prefix}}}"
        keys: list[str | bytes] = [f"{tag}:{suffix}" for suffix in ("cfg", "proj", "cent", "tune")]
        for shard in range(self._shards):
            keys += [*self.script_keys(shard), self.lease_key(shard)]
        used = await asyncio.gather(*(self._client.memory_usage(key) for key in keys))
        return sum(int(u or 0) for u in used) + await self._group_memory()

    async def _group_memory(self) -> int:
        """Bytes of the record groups, from ``MEMORY USAGE`` of up to
        ``GROUP_SAMPLE`` of them a shard, scaled to all; the shards at once."""
        shards = range(self._shards if self.groups else 0)
        return sum(await asyncio.gather(*(self._shard_group_memory(shard) for shard in shards)))

    async def _shard_group_memory(self, shard: int) -> int:
        keys = self._group_keys(shard)
        picked = np.random.default_rng().permutation(len(keys))[:GROUP_SAMPLE]
        pipe = self._client.pipeline(transaction=False)
        for at in picked.tolist():
            pipe.memory_usage(keys[at])
        used = [int(u or 0) for u in await pipe.execute()]
        return round(sum(used) * len(keys) / max(1, len(picked)))

    async def sample_ids(self, count: int) -> IdArray:
        """About ``count`` distinct random ids, from each shard in proportion to its size."""
        sizes = await self._shard_sizes()
        total = sum(sizes)
        if not total:
            return np.empty(0, np.int64)
        picked = await asyncio.gather(
            *(self._random_fields(s, -(-count * size // total)) for s, size in enumerate(sizes) if size)
        )
        ids = self._ids(b"".join(i for shard in picked for i in shard if isinstance(i, bytes)))
        return np.sort(np.random.default_rng().permutation(ids)[:count])

    async def _random_fields(self, shard: int, count: int) -> list[bytes]:
        """About ``count`` distinct random ids of a shard: HRANDFIELD of its
        record hash, or of as many random record groups, a few from each."""
        if not self.groups:
            fields = await self._client.hrandfield(self.signature_key(shard), count)
            return [f for f in fields or [] if isinstance(f, bytes)]
        keys = self._group_keys(shard)
        picked = np.random.default_rng().permutation(len(keys))[:count]
        each = -(-count // max(1, len(picked)))
        pipe = self._client.pipeline(transaction=False)
        for at in picked.tolist():
            pipe.hrandfield(keys[at], each)
        return [field for fields in await pipe.execute() for field in fields or []]

    async def saved_tuning(self) -> bytes | None:
        return _bytes(await self._client.get(tuning_key(self._prefix)))

    async def config_and_tuning(self) -> tuple[bytes | None, bytes | None]:
        """The stored configuration and tuning in one round trip (one hash tag)."""
        config, tuning = await self._client.mget(meta_keys(self._prefix)[0], tuning_key(self._prefix))
        return _bytes(config), _bytes(tuning)

    async def save_tuning(self, tuning: bytes) -> None:
        await self._client.set(tuning_key(self._prefix), tuning)

    async def _shard_sizes(self) -> list[int]:
        return list(await asyncio.gather(*(self._shard_size(s) for s in range(self._shards))))

    async def _shard_size(self, shard: int) -> int:
        """Ids in a shard: the length of its record hash, or its id count."""
        if not self._layout.grouped:
            return int(await self._client.hlen(self.signature_key(shard)))
        return int(await self._client.get(self.script_keys(shard)[3]) or 0)

    async def count(self) -> int:
        return sum(await self._shard_sizes())


def groups_for(trained_for: int, shards: int) -> int:
    """Record groups a shard: a power of two giving about ``RECORDS_PER_GROUP``
    records each at the size the partition was fitted for, so an index can
    grow to four times that (when ``stats()`` calls it outgrown) before a
    group passes Redis's default listpack limit of 128 entries."""
    wanted = max(1.0, trained_for / (RECORDS_PER_GROUP * shards))
    return 1 << math.ceil(math.log2(wanted))


def group_of(ids: IdArray, groups: int) -> npt.NDArray[np.int64]:
    """Each id's record group, as ``_scripts._RECORD_KEY`` computes it."""
    b = ids.astype("<i8").view(np.uint8).reshape(-1, 8).astype(np.int64)
    h = b[:, 0] + 256 * b[:, 1] + 65536 * b[:, 2]
    h = (h * 40503 + b[:, 3] + 256 * b[:, 4] + 65536 * b[:, 5]) % _MIX
    h = (h * 40503 + b[:, 6] + 256 * b[:, 7]) % _MIX
    h = (h * 10368889) % _MIX
    group: npt.NDArray[np.int64] = (h * groups) // _MIX
    return group


RECORDS_PER_GROUP = 32
#: Record groups whose ``MEMORY USAGE`` ``stats()`` reads, at most, a shard.
GROUP_SAMPLE = 1_000
_MIX = 1 << 24


def plan_keys(plan: bytes, width: int) -> list[bytes]:
    """The bucket key suffixes a probe plan packs, ``width`` bytes each."""
    return [plan[at : at + width] for at in range(0, len(plan), width)]


def packed_id(id_: int | np.integer[Any]) -> bytes:
    """An id as scripts take it: 8 little-endian bytes (an index of 4-byte
    ids keeps the first 4 as hash field and bucket entry)."""
    return int(id_).to_bytes(8, "little", signed=True)


def parse_ids(packed: bytes, id_bytes: int) -> IdArray:
    """Concatenated ids of ``id_bytes`` each (4: unsigned), read without a parse."""
    return np.frombuffer(packed, dtype="<i8" if id_bytes == 8 else "<u4").astype(np.int64, copy=False)


def count_ids(ids: IdArray) -> tuple[IdArray, npt.NDArray[np.int64]]:
    """Distinct ids, ascending, and how many probed buckets named each.

    A query reads 30,000 ids at 100k and 200,000 at 1M, each id once per band
    it shares. Ids that are dense non-negative integers (the usual primary
    key) are counted with ``bincount``; others are sorted, as uint32 when they
    fit. Measured on 200,000 ids below 1M: bincount 3.4 ms, uint32 sort 4.9
    ms, int64 sort 8.2 ms, ``np.unique`` with counts 9.2 ms.
    """
    if not len(ids):
        return ids, np.empty(0, np.int64)
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < 8 * len(ids) + 65_536:
        counts = np.bincount(ids)
        distinct = np.flatnonzero(counts)
        return distinct.astype(np.int64, copy=False), counts[distinct]
    narrow = ids.astype(np.uint32) if low >= 0 and high < 2**32 else ids
    ordered = np.sort(narrow)
    first = np.ones(len(ordered), bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return ordered[starts].astype(np.int64), np.diff(starts, append=len(ordered))


def nearest_buckets(
    buckets: Sequence[bytes],
    cap: int,
    id_bytes: int = 8,
    first_named: Callable[[IdArray], npt.NDArray[np.intp]] | None = None,
) -> IdArray:
    """With one table each id is in one bucket, and the buckets come best
    first: a capped query keeps whole buckets in that order and, from the
    bucket that crosses the cap, its smallest ids. The order of ids inside a
    bucket depends on which write reached Redis first, so cutting it as it
    stands would make a capped query differ from run to run. With
    ``first_named`` (where each id is first named: :class:`FirstNamed`), an id
    may be in two of the buckets (a spilled index): it is kept once, and
    counts at the first."""
    named = parse_ids(b"".join(buckets), id_bytes)
    kept = first_named(named) if first_named is not None else None
    if (len(named) if kept is None else len(kept)) <= cap:
        return named if kept is None else named[kept]
    owner = np.repeat(np.arange(len(buckets)), [len(bucket) // id_bytes for bucket in buckets])
    if kept is not None:
        named, owner = named[kept], owner[kept]
    ends = np.searchsorted(owner, np.arange(len(buckets)), side="right")  # ids through each bucket
    whole = int(np.searchsorted(ends, cap, side="right"))  # buckets that fit whole
    start = int(ends[whole - 1]) if whole else 0
    boundary = np.sort(named[start : int(ends[whole])])[: cap - start]
    return np.concatenate([named[:start], boundary])


class FirstNamed:
    """Where each id is first named among a query's bucket ids, in order: a
    spilled index names most candidates twice. A table by id, kept from query
    to query, finds them in two passes over the ids (12,000 ids below 100k:
    0.15 ms, against 0.48 ms for ``count_ids``' bincount and 1.9 ms for
    ``np.unique``, which ids too sparse for a table still get: past eight
    times the index's size)."""

    def __init__(self, index_size: Callable[[], int]) -> None:
        self._index_size = index_size
        self._table = np.empty(0, np.int32)

    def __call__(self, named: IdArray) -> npt.NDArray[np.intp]:
        if not len(named):
            return np.empty(0, np.intp)
        low, high = int(named.min()), int(named.max())
        if low < 0 or high >= 8 * max(len(named), self._index_size()) + 65_536:
            first = np.unique(named, return_index=True)[1]
            return np.sort(first)
        if high >= len(self._table):
            self._table = np.empty(high + 1 + high // 4, np.int32)  # grown with headroom, never cleared
        order = np.arange(len(named), dtype=np.int32)
        # Every slot read below is written first, so stale entries never matter.
        self._table[named] = len(named)
        np.minimum.at(self._table, named, order)
        kept: npt.NDArray[np.intp] = np.flatnonzero(self._table[named] == order)
        return kept


def most_named(ids: IdArray, hits: npt.NDArray[np.int64], cap: int) -> IdArray:
    """The ``cap`` ids named by the most probed buckets, ties to the smaller id
    (so a capped query is deterministic). Counts are small integers, so a
    histogram finds the cut-off without sorting 50,000 candidates."""
    at_least = np.bincount(hits)[::-1].cumsum()[::-1]  # at_least[c]: ids named c or more times
    cut = int(np.flatnonzero(at_least >= cap)[-1])
    keep = hits > cut
    keep[np.flatnonzero(hits == cut)[: cap - int(keep.sum())]] = True
    return ids[keep]


def _bytes(reply: object) -> bytes | None:
    return reply if isinstance(reply, bytes) else None
