"""Break the code on purpose, one way at a time, and check that the test
guarding it fails: ``nox -s breakages``. Each breakage once passed the whole
suite (issue 16's audit) or guards a promise the README makes. Breakages
are made in copies of ``src/``, two at a time (``LSHRS_BREAKAGE_WORKERS``),
so the checkout itself is never modified.

Exits non-zero if any breakage survives its test.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (what is broken, file, text, broken text, tests that must fail)
BREAKAGES = [
    (
        "change-log gap check removed",
        "src/lshrs/_scripts.py",
        "elseif known >= 0 and gap > 0 and gap <= redis.call('LLEN', KEYS[3]) then",
        "elseif known >= 0 and gap > 0 then",
        "test_regressions.py -k change_log",
    ),
    ("a capped learned query keeps the smallest ids", "src/lshrs/_index.py",
     "            ids = nearest_buckets(buckets, cap, self.id_bytes)",
     "            ids = np.sort(self._ids(b''.join(buckets)))[:cap]",
     "test_regressions.py -k capped"),
    ("a capped banded query keeps the smallest ids", "src/lshrs/_index.py",
     "                ids = most_named(ids, hits, cap)", "                ids = ids[:cap]", "test_regressions.py -k capped"),
    (
        "index() writes the index before the store",
        "src/lshrs/_lshrs.py",
        "                    if isinstance(store, WritableStore):\n"
        "                        await store.put(rows.ids, rows.vectors, rows.texts)\n"
        "                    await opened.sharded.upsert(rows.ids, records, chain)",
        "                    await opened.sharded.upsert(rows.ids, records, chain)\n"
        "                    if isinstance(store, WritableStore):\n"
        "                        await store.put(rows.ids, rows.vectors, rows.texts)",
        "test_regressions.py -k store_write",
    ),
    (
        "delete() empties the store before the index",
        "src/lshrs/_lshrs.py",
        "                    removed = await index.delete(id_array)\n"
        "                    if isinstance(self._store, WritableStore):\n"
        "                        await self._store.remove(id_array)",
        "                    if isinstance(self._store, WritableStore):\n"
        "                        await self._store.remove(id_array)\n"
        "                    removed = await index.delete(id_array)",
        "test_regressions.py -k index_delete",
    ),
    ("no write leases", "src/lshrs/_lshrs.py",
     "        if not isinstance(self._store, WritableStore):\n            yield\n            return\n        token",
     "        if True:\n            yield\n            return\n        token", "test_integrity.py"),
    ("ids the store lacks kept in the rerank", "src/lshrs/_lshrs.py",
     "        rows_of = order[at[sorted_ids[at] == ids]]", "        rows_of = order[at]",
     "test_regressions.py -k store_lacks"),
    ("hyperplanes see the first 8 dimensions only", "src/lshrs/_family.py",
     "        return self.bands.pack(vectors @ self._projection > 0)",
     "        return self.bands.pack(vectors[:, :8] @ self._projection[:8] > 0)", "test_properties.py"),
    ("Redis socket timeouts removed", "src/lshrs/_connect.py",
     'options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **(extra or {})}',
     "options = {**(extra or {})}", "test_reliability.py -k frozen"),
    ("Postgres ids cast to int4", "src/lshrs/adapters/_postgres.py",
     "= ANY($1::bigint[])", "= ANY($1::integer[])", "test_regressions.py -k int32"),
    ("a caller's pool closed", "src/lshrs/adapters/_postgres.py",
     "        if self._dsn is not None and self._pool is not None:", "        if self._pool is not None:",
     "test_regressions.py -k pool"),
    ("skipped_nulls never reset", "src/lshrs/adapters/_postgres.py",
     "            self.skipped_nulls = 0\n            query", "            query", "test_regressions.py -k skipped"),
    ("a PostgreSQL timeout raised without saying what timed out", "src/lshrs/adapters/_postgres.py",
     "        except asyncio.TimeoutError as error:", "        except ZeroDivisionError as error:",
     "test_deadlines.py -k frozen_postgres"),
    ("a PostgreSQL connection waited on for asyncpg's 60 s", "src/lshrs/adapters/_postgres.py",
     "connect = _CONNECT_SECONDS if self._timeout is None else self._timeout", "connect = _CONNECT_SECONDS",
     "test_deadlines.py -k connecting_to_a_frozen"),
    ("a PostgreSQL connection waited on forever with command_timeout=None", "src/lshrs/adapters/_postgres.py",
     "connect = _CONNECT_SECONDS if self._timeout is None else self._timeout", "connect = self._timeout",
     "test_deadlines.py -k connecting_to_a_frozen"),
    ("Postgres SELECT from raw, unquoted names", "src/lshrs/adapters/_postgres.py",
     "        id_sql, vec_sql = quote_ident(id_column), quote_ident(vector_column)",
     "        id_sql, vec_sql = id_column, vector_column", "test_regressions.py -k quoted"),
    ("no deadline per call", "src/lshrs/_admission.py",
     "anyio.CancelScope(deadline=self._started + self._seconds)", "anyio.CancelScope()",
     "test_deadlines.py -k own_deadline"),
    ("the admission queue unbounded", "src/lshrs/_admission.py",
     "if len(self._waiting) >= self.most_waiting:", "if False:", "test_deadlines.py -k overload"),
    ("a public call left in a reference cycle (garbage only a collection frees)", "src/lshrs/_admission.py",
     "        self._admission, self._seconds, self._what = admission, seconds, what\n",
     "        self._admission, self._seconds, self._what = admission, seconds, what\n        self._me = self\n",
     "test_deadlines.py -k cyclic"),
    ("max_waiting ignored (the default queue whatever it says)", "src/lshrs/_admission.py",
     "WAITING_PER_SLOT * limit if waiting is None else waiting", "WAITING_PER_SLOT * limit",
     "test_deadlines.py -k overload"),
    ("a wait past the deadline queued", "src/lshrs/_admission.py",
     "if remaining is not None and expected > ADMIT_WITHIN * remaining:", "if False:",
     "test_deadlines.py -k would_pass"),
    ("a call queued to the very edge of its deadline", "src/lshrs/_admission.py",
     "ADMIT_WITHIN = 0.5", "ADMIT_WITHIN = 1.0", "test_deadlines.py -k would_pass"),
    ("tune(save=False) saves its probes all the same", "src/lshrs/_lshrs.py",
     "        if save:", "        if True:", "test_recall.py -k reaches_the_target_and_is_saved"),
    ("a dropped index reopened on a new client, orphaning the first", "src/lshrs/_lshrs.py",
     "client = self._given_client or self._client or await connect(",
     "client = self._given_client or await connect(", "test_core.py -k keeps_its_client"),
    ("timed-out calls teach the queue that calls are short", "src/lshrs/_admission.py",
     "            held = max(held, self._hold)", "            pass", "test_deadlines.py -k do_not_teach"),
    ("a write cancelled between store and index", "src/lshrs/_lshrs.py",
     "    return anyio.CancelScope(shield=True)", "    return anyio.CancelScope()", "test_deadlines.py -k cut"),
    ("a flushed index unnoticed", "src/lshrs/_lshrs.py",
     "if config is None or IndexConfig.from_json(config) != opened.config:", "if False:",
     "test_deadlines.py -k flushed"),
    ("a failed build raises an ExceptionGroup", "src/lshrs/_lshrs.py",
     "            raise error from None", "            raise", "test_deadlines.py -k streamed_build"),
    ("reconcile trusts bucket membership", "src/lshrs/_scripts.py",
     "    if not contains(redis.call('GET', key) or '', sid) then", "    if false then",
     "test_reconcile.py -k difference"),
    ("reconcile leaves strays", "src/lshrs/_scripts.py",
     "    if seen[sid] or not sig or", "    if false and", "test_reconcile.py -k difference"),
    ("reconcile keeps ids gone from the store", "src/lshrs/_lshrs.py",
     "gone = np.setdiff1d(await index.indexed_ids(), stored)", "gone = np.empty(0, dtype=np.int64)",
     "test_reconcile.py -k difference"),
    ("no reconnect after a quiet restart", "src/lshrs/_connect.py",
     "**{**reconnect, **options})", "**options)", "test_reliability.py -k quiet"),
    ("a filtered query never widens", "src/lshrs/_lshrs.py",
     "                if want > scales[i] and not done[i]:", "                if False:",
     "test_filters.py -k exact_filtered"),
    ("a filtered query that met its cap in its first round reads again", "src/lshrs/_lshrs.py",
     "        done = [len(c.ids) >= self._max_candidates for c in found]", "        done = [False for c in found]",
     "test_filters.py -k widens_only"),
    ("a record deleted before a warm query's fetch is kept as present", "src/lshrs/_index.py",
     "        present = np.array([sig is not None for sig in fetched], dtype=bool)",
     "        present = np.ones(len(fetched), dtype=bool)", "test_core.py -k deleted_between"),
    ("redis-py's closed-connection AttributeError reaches callers", "src/lshrs/_admission.py",
     "            raise lost from exc", "            pass", "test_failover.py -k closed"),
    ("a failed write's other scripts run on after it", "src/lshrs/_index.py",
     "        return list(await asyncio.gather(*tasks))\n    except BaseException:",
     "        return list(await asyncio.gather(*tasks))\n    except ZeroDivisionError:",
     "test_regressions.py -k nothing_running"),
    ("a filter is asked about every candidate", "src/lshrs/_filters.py",
     "        return unasked[: int(np.searchsorted(unasked, level_end))]", "        return unasked",
     "test_filters.py -k few_hundred"),
    ("a filter's checks ignore distance levels", "src/lshrs/_filters.py",
     "        return unasked[: int(np.searchsorted(unasked, level_end))]",
     "        return unasked[: int(np.searchsorted(unasked, last)) + 1]", "test_filters.py -k nearest_first"),
    ("a selective filter searches the index", "src/lshrs/_filters.py",
     "PREFILTER_DEPTHS = 8", "PREFILTER_DEPTHS = 0", "test_filters.py -k selective"),
    ("the exact filter path returns ids deleted from the index", "src/lshrs/_lshrs.py",
     "        few = few.only(await opened.sharded.held(few.ids))", "        pass  # ",
     "test_filters.py -k selective"),
    ("a filtered query short of top_k keeps its short list", "src/lshrs/_lshrs.py",
     "            for i, answer in zip(short, exact or []):", "            for i, answer in zip(short, []):",
     "test_filters.py -k exact_filtered"),
    ("a failed lease release is not retried", "src/lshrs/_lshrs.py",
     "            if loop.time() + pause > lapsed:\n                raise",
     "            if True:\n                raise", "test_reliability.py -k retried_until"),
    ("a build's cache vouches for its records after another client wrote meanwhile", "src/lshrs/_cache.py",
     "            if span.unbroken and cached.generation is None and len(cached) == span.cached:",
     "            if span.first is not None and cached.generation is None and len(cached) == span.cached:",
     "test_core.py -k own_build_warm"),
    ("a build's client drops what it cached at its first query", "src/lshrs/_index.py",
     "    def end_writes(self, chain: WriteChain) -> None:\n        self._cache.claim(chain)",
     "    def end_writes(self, chain: WriteChain) -> None:\n        pass", "test_core.py -k own_build_warm"),
    ("a widening filtered query reads its nearest buckets again", "src/lshrs/_lshrs.py",
     "            keys = [_unread(k, seen, index.probe_key_width) for k, (seen, _) in zip(keys, unread)]",
     "            keys = list(keys)", "test_filters.py -k reads_each_bucket_once"),
    ("a write gives up on a held lease at the client's timeout, not its own deadline", "src/lshrs/_lshrs.py",
     "        give_up = min(lapsed, anyio.current_effective_deadline() - _LEASE_MARGIN)",
     "        give_up = min(lapsed, started + (self._timeout or math.inf))", "test_reliability.py -k lease"),
    ("the signature cache counts evicted entries", "src/lshrs/_cache.py",
     "        self.alive = int(self.live.sum())", "        pass", "test_core.py -k counts_what_writes"),
    ("an id cached again keeps its old signature live in the large tier", "src/lshrs/_cache.py",
     "        self.main.evict(added)\n", "", "test_core.py -k added_again"),
    ("a waiter cancelled as its slot arrives keeps the slot", "src/lshrs/_admission.py",
     "            else:  # handed a slot while being cancelled: pass it on\n                self._release()\n",
     "", "test_deadlines.py -k cancelled_as"),
    ("a deadline's scope swallowing the cancellation it caused (index() returns)", "src/lshrs/_admission.py",
     "    if scope.cancelled_caught:\n", "    if False:\n", "test_deadlines.py -k own_deadline"),
    ("a public call cut off by its deadline teaching the queue that calls are short", "src/lshrs/_admission.py",
     "self._started, finished=kind is None)", "self._started)", "test_deadlines.py -k own_work"),
    ("a coalesced batch stopped when one of its callers gives up", "src/lshrs/_coalesce.py",
     "all(future.done() for _, future in batch)", "any(future.done() for _, future in batch)",
     "test_core.py -k concurrent_queries"),
    ("a coalesced batch running on after every caller gave up", "src/lshrs/_coalesce.py",
     "future.add_done_callback(functools.partial(_abandon, task, batch))", "pass",
     "test_core.py -k concurrent_queries"),
    ("a resumed build hashes every row again", "src/lshrs/_lshrs.py",
     "if skip_held else rows for rows in usable]", "if False else rows for rows in usable]",
     "test_reconcile.py -k resumed"),
    ("the int8 partition read without its scales", "src/lshrs/_partition.py",
     'scales = np.frombuffer(raw[at : at + 4 * rows], "<f4").astype(np.float32)',
     "scales = np.ones(rows, np.float32)",
     "test_partition.py"),
    ("a build cut short leaves its store's rows open", "src/lshrs/_lshrs.py",
     "                if close is not None:", "                if False:", "test_reconcile.py -k resumed"),
    ("reconcile leaves a grouped shard's id count off", "src/lshrs/_lshrs.py",
     "        await index.recount()\n", "", "test_reconcile.py -k repairs_exactly"),
    ("an upsert does not count the ids it adds", "src/lshrs/_scripts.py",
     "counted(added)\nreturn {#logged,", "return {#logged,", "test_codes.py -k new_learned"),
    ("the scripts group records unlike numpy", "src/lshrs/_scripts.py",
     "  h = (h * 10368889) % 16777216", "  h = (h * 10368887) % 16777216", "test_codes.py -k new_learned"),
    ("codes name each slice's farthest centroid", "src/lshrs/_codes.py",
     "np.argmax(slices[j] @ scorers[j], axis=1)", "np.argmin(slices[j] @ scorers[j], axis=1)",
     "test_codes.py -k closely"),
    ("a learned index reranks as deep as a SimHash one", "src/lshrs/_family.py",
     "simhash_rerank(size) // 2 if self._codes", "simhash_rerank(size) if self._codes",
     "test_core.py -k rerank_depth"),
    ("an index of 4-byte ids stores 8", "src/lshrs/_scripts.py",
     "  if idw == 8 then return id end\n  return string.sub(id, 1, idw)", "  return id",
     "test_id_bytes.py -k refused"),
    ("a delete of an id past 4 bytes removes the id that shares its low bytes", "src/lshrs/_index.py",
     "self._per_shard(ids[self.fits(ids)], self._delete)", "self._per_shard(ids, self._delete)",
     "test_id_bytes.py -k refused"),
    ("a store's id past 4 bytes is written cut short", "src/lshrs/_lshrs.py",
     "            check_id_bytes(rows.ids, opened.config.id_bytes)", "            pass",
     "test_id_bytes.py -k refused"),
    ("a store's build stops at its first bad row", "src/lshrs/_lshrs.py",
     "usable = block if screen is None else [screen.usable(rows, opened.config.dim) for rows in block]",
     "usable = block", "test_bad_rows.py -k skips_and_counts"),
    ("strict=True ignored", "src/lshrs/_lshrs.py", "        if found and self.strict:", "        if False:",
     "test_bad_rows.py -k skips_and_counts"),
    ("a PostgreSQL row of another length fails its batch", "src/lshrs/adapters/_postgres.py",
     "        if any(reasons):", "        if False:", "test_bad_rows.py -k skips_and_counts"),
    ("an array holding NULLs at a vector's length read as a vector", "src/lshrs/adapters/_postgres.py",
     'if self._kind in ("bytea", "vector") and self._dim else None', "if self._dim else None",
     "test_bad_rows.py -k sqlalchemy_and"),
    ("a build out of memory raises redis's bare refusal", "src/lshrs/_lshrs.py",
     "            if isinstance(error, OutOfMemoryError):", "            if False:",
     "test_bad_rows.py -k out_of_memory"),
    ("an out-of-memory build sizes the whole build by the rows it wrote", "src/lshrs/_errors.py",
     "        rows = total if total is not None else written", "        rows = written",
     "test_bad_rows.py -k out_of_memory_says"),
    ("a build whose compaction meets maxmemory fails though its index is whole", "src/lshrs/_lshrs.py",
     "        except OutOfMemoryError:  # the index is whole; rewriting a bucket needs room for its copy",
     "        except ZeroDivisionError:", "test_bad_rows.py -k compaction"),
    ("PostgresStore's filter reads the passing ids as floats (ids past 2**53 change)",
     "src/lshrs/adapters/_postgres.py",
     "            found = np.fromiter((r[0] for r in records), dtype=np.int64, count=len(records))",
     "            found = np.fromiter((r[0] for r in records), dtype=None, count=len(records))",
     "test_filters.py -k past_2_to_the_53"),
    ("a page sample cut down to the rows asked draws them with replacement", "src/lshrs/adapters/_postgres.py",
     "choice(len(found), count, replace=False)", "choice(len(found), count, replace=True)",
     "test_stores.py -k statistics_are_off"),
    ("PostgresStore's command_timeout never reaches its pool", "src/lshrs/adapters/_postgres.py",
     "min_size=1, max_size=self._pool_size, command_timeout=self._timeout",
     "min_size=1, max_size=self._pool_size", "test_deadlines.py -k frozen_postgres"),
    ("a cold grouped query's script returns no records", "src/lshrs/_scripts.py",
     "    local sig = redis.call('HGET', record_key(full(ids[i])), ids[i])",
     "    local sig = false", "test_core.py -k one_round_trip"),
    ("a warm query's pipeline ignores the change log it reads", "src/lshrs/_index.py",
     "            self._observe(shard, known, generation, size, changed, covered)\n            read = iter(reply[1:])",
     "            self._observe(shard, known, generation, size, b'', covered)\n            read = iter(reply[1:])",
     "test_core.py -k still_follows_writes"),
    ("a warm pipeline reads only its first query's buckets", "src/lshrs/_index.py",
     "        for plan in plans:\n            if plan:\n", "        for plan in plans[:1]:\n            if plan:\n",
     "test_core.py -k query_many_matches_single"),
    ("a reader opened before training never adopts the partition", "src/lshrs/_lshrs.py",
     "            opened = await self._trained(fit=False)", "            pass",
     "test_core.py -k opened_before_the_build"),
    ("a warm scan keeps records rewritten while it ran", "src/lshrs/_index.py",
     "            if changed:\n                current = ~np.isin(", "            if False:\n                current = ~np.isin(",
     "test_core.py -k warm_scan_keeps"),
    ("a cold reply handled late caches records older than the cache's generation", "src/lshrs/_index.py",
     "self._cache.add_read(shard, int(generation), self._ids(ids)", "self._cache.add(shard, self._ids(ids)",
     "test_core.py -k cold_reply_handled"),
    ("a cold query fails on a bucket id without a record", "src/lshrs/_scripts.py",
     "    if sig then kept[#kept + 1] = ids[i]; sigs[#sigs + 1] = sig end",
     "    kept[#kept + 1] = ids[i]; sigs[#sigs + 1] = sig", "test_regressions.py -k record_was_lost"),
    ("a large partition opens groups by the wrong rule", "src/lshrs/_partition.py",
     "probes * len(self.coarse) / self.buckets)", "probes * len(self.coarse) * self.buckets)",
     "test_partition.py -k best_children"),
    ("the memory store's id array misses a moved row", "src/lshrs/adapters/_memory.py",
     "                    self._row_at[moved] = row", "                    pass",
     "test_stores.py -k order_asked"),
    ("a learned index reads the square root's buckets past 256", "src/lshrs/_family.py",
     "(PROBE_FACTOR, PROBE_FLOOR, PROBE_CEILING)", "(PROBE_FACTOR, PROBE_FLOOR, 10**9)",
     "test_partition.py -k between_128_and_256"),
    ("a stored partition scores a group without its rows' scales", "src/lshrs/_partition.py",
     "    return scores if scales is None else scores * scales[picked]",
     "    return scores", "test_partition.py -k best_children"),
    ("a row's choices rescored without the stored rows' scales", "src/lshrs/_partition.py",
     "    return scores if partition.fine_scales is None else scores * partition.fine_scales[picked]",
     "    return scores", "test_partition.py -k two_nearest_groups"),
    ("a batch of queries scores each group for the wrong rows", "src/lshrs/_partition.py",
     "score(queries[at // per_query]", "score(queries[at % per_query]", "test_core.py -k flat_size"),
    ("the sieve keeps the least principal axes", "src/lshrs/_partition.py",
     "axes[:, ::-1][:, :kept]", "axes[:, :kept]", "test_partition.py -k sieved"),
    ("a sieved plan keeps its first pass's best, not rescored", "src/lshrs/_partition.py",
     "return found if count == probes else self._rescored(unit_query, found, probes)",
     "return found[:probes]", "test_partition.py -k sieved"),
    ("a build's hashed parts joined out of order", "src/lshrs/_cores.py",
     "    return np.concatenate(done)", "    return np.concatenate(done[::-1])", "test_cores.py -k joined_in_order"),
    ("overlapping hashed batches lift the BLAS limit at the first one's end", "src/lshrs/_cores.py",
     "            if self.holders == 0 and self.limit is not None:", "            if self.limit is not None:",
     "test_cores.py -k overlapping"),
    ("a batch's records taken from the start of its block", "src/lshrs/_lshrs.py",
     "records[end - len(rows) : end]", "records[: len(rows)]", "test_core.py -k build"),
    ("a large sample's coarse level never leaves its quarter", "src/lshrs/_partition.py",
     "        coarse = _lloyd(unit, coarse, _LATE_ITERATIONS, rng)\n", "", "test_partition.py -k quarter"),
    ("the hyperplane prober scales margins by 1/odds", "src/lshrs/_hashing.py",
     "rows)) * _NEIGHBOUR_ODDS, _MAX_Z)", "rows)) / _NEIGHBOUR_ODDS, _MAX_Z)",
     "test_recall.py -k likeliest"),
    ("a learned record hashes a vector's length too", "src/lshrs/_family.py",
     "unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)",
     "unit = vectors * np.linalg.norm(vectors, axis=1, keepdims=True)", "test_codes.py -k length"),
    ("a capped spilled query keeps the smallest ids", "src/lshrs/_index.py",
     "ids = nearest_buckets(buckets, cap, self.id_bytes, self._first_named)",
     "ids = np.unique(self._ids(b''.join(buckets)))[:cap]", "test_regressions.py -k capped"),
    ("a spilled query keeps an id its two buckets name twice", "src/lshrs/_index.py",
     "kept = first_named(named) if first_named is not None else None", "kept = None",
     "test_spill.py -k one_bucket_a_table"),
    ("an id named twice counts at its last bucket", "src/lshrs/_index.py",
     "np.minimum.at(self._table, named, order)", "np.maximum.at(self._table, named, order)",
     "test_core.py -k first_named"),
    ("filter checks break distance ties by bucket order", "src/lshrs/_filters.py",
     "self._order = np.lexsort((candidates.ids, distance))", "self._order = np.argsort(distance, kind='stable')",
     "test_filters.py -k whole_distance_levels"),
    ("hiredis packing sends a two-word command name as one", "src/lshrs/_connect.py",
     "args = (*args[0].encode().split(), *args[1:])", "args = (args[0].encode(), *args[1:])",
     "test_core.py -k hiredis"),
    ("a spilled row's second bucket is its second nearest", "src/lshrs/_partition.py",
     "cost += SPILL_WEIGHT * (along[:, None] - across) ** 2", "pass", "test_partition.py -k spill"),
    ("a row's buckets are chosen by its batch's product", "src/lshrs/_partition.py",
     "exact: FloatArray = np.where(np.isfinite(scores), _gathered_scores(self, choices, unit), -np.inf)",
     "exact: FloatArray = scores", "test_partition.py -k tied_between"),
    ("an exact tie between buckets goes by the batch's partitioning order", "src/lshrs/_partition.py",
     "order = np.argsort(choices, axis=1, kind=\"stable\")", "order = np.argsort(-scores, axis=1, kind=\"stable\")",
     "test_partition.py -k tied_between"),
    ("a spilled row's second bucket sought in its two nearest groups only", "src/lshrs/_partition.py",
     "return max(_ASSIGN_GROUPS, math.ceil(", "return min(_ASSIGN_GROUPS, math.ceil(", "test_partition.py -k spill"),
    ("a spilled query reads its first table only", "src/lshrs/_family.py",
     "keys[:, :, 0] = np.arange(self.tables)", "keys[:, :, 0] = 0", "test_spill.py -k finds_more"),
    ("a lone row is scored by BLAS's matrix-vector kernel", "src/lshrs/_partition.py",
     "    if rows.ndim == 2 and len(rows) == 1:", "    if False:", "test_partition.py -k hashed_alone"),
    ("a build writes rows a delete removed after it read them", "src/lshrs/_lshrs.py",
     "still = await self._still_stored(store, rows.ids)", "still = np.ones(len(rows.ids), dtype=bool)",
     "test_integrity.py -k between_a_builds_read"),
    ("a cancelled build's store cleanup is cut by the cancellation", "src/lshrs/_lshrs.py",
     "with anyio.move_on_after(_CLOSE_SECONDS, shield=True):", "with anyio.move_on_after(_CLOSE_SECONDS, shield=False):",
     "test_reconcile.py -k clean_up"),
    ("a store's batches() must have aclose()", "src/lshrs/_lshrs.py",
     'close = getattr(batches, "aclose", None)', 'close = getattr(batches, "aclose")',
     "test_reconcile.py -k plain_async"),
    ("a coalesced batch of queries ends at the client's timeout", "src/lshrs/_lshrs.py",
     "self._coalescer = Coalescer(self._query_many)",
     "self._coalescer = Coalescer(lambda *a: asyncio.wait_for(self._query_many(*a), self._timeout))",
     "test_deadlines.py -k each_keep_their_own"),
    ("drop() deletes every key on the server", "src/lshrs/_lshrs.py",
     "client.scan_iter(match=pattern, count=1000)", "client.scan_iter(count=1000)",
     "test_core.py -k drop_deletes_its_own"),
]  # fmt: skip


def main() -> int:
    workers = int(os.environ.get("LSHRS_BREAKAGE_WORKERS", "2"))
    with tempfile.TemporaryDirectory(prefix="lshrs-breakages-") as scratch:
        # Each worker breaks its own copy of src/, imported ahead of the
        # installed package through PYTHONPATH: two breakages run at once
        # (most of a test's time is waiting on servers) and the checkout is
        # never modified.
        copies: queue.Queue[Path] = queue.Queue()
        for worker in range(workers):
            copy = Path(scratch) / str(worker)
            shutil.copytree(ROOT / "src", copy / "src")
            copies.put(copy)

        def check(breakage: tuple[str, str, str, str, str]) -> bool:
            name, path, text, broken, tests = breakage
            original = (ROOT / path).read_text()
            if text not in original:
                print(f"{name}: the text to break is gone from {path}: update tests/breakages.py", flush=True)
                return False
            copy = copies.get()
            try:
                (copy / path).write_text(original.replace(text, broken, 1))
                command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
                command += [f"tests/{tests.split()[0]}", *tests.split()[1:]]
                # A failure is enough; shrinking a property test's failure is slow.
                env = {**os.environ, "LSHRS_NO_SHRINK": "1", "PYTHONPATH": str(copy / "src")}
                started = time.monotonic()
                run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
            finally:
                (copy / path).write_text(original)
                copies.put(copy)
            code = run.returncode
            verdict = "caught" if code == 1 else "SURVIVED" if code == 0 else f"error {code}"
            took = time.monotonic() - started
            print(f"{verdict:9} {took:5.1f} s  {name}  ({tests})", flush=True)
            return code == 1

        with ThreadPoolExecutor(workers) as pool:
            caught = list(pool.map(check, BREAKAGES))
    print(f"{sum(caught)} of {len(BREAKAGES)} breakages caught")
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main())
