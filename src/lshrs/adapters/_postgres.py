"""``PostgresStore``: an existing table read through an asyncpg pool, never written."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import NULL_VECTOR, Rows
from ._codecs import blob_size, decode, kind_of, quote_ident, readable

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("PostgresStore needs asyncpg: pip install 'lshrs[postgres]'") from exc

logger = logging.getLogger("lshrs")

#: A table at least this many times larger than a sample is sampled by pages.
_SAMPLE_BY_PAGES = 4

#: Seconds a connection may take when ``command_timeout=None`` lifts the
#: limit on statements: asyncpg's own default, stated so that it holds.
_CONNECT_SECONDS = 60.0

_SEND = {"real[]": "array_send", "double precision[]": "array_send", "vector": "vector_send"}


class PostgresStore:
    """Rows of ``table`` (``id_column``, ``vector_column``, optional ``text_column``).

    ``dsn_or_pool`` is a DSN (the store opens and closes its own pool) or an
    ``asyncpg.Pool`` (left open). The vector column may be ``real[]``,
    ``double precision[]``, ``bytea`` (little-endian float32) or pgvector
    ``vector``; rows with a NULL vector are skipped and counted in
    ``skipped_nulls``, and with those of another length (or a NULL element)
    in each batch's ``left_out``, which ``LSHRS.index()`` reports.
    """

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        table: str,
        id_column: str = "id",
        vector_column: str = "embedding",
        text_column: str | None = None,
        pool_size: int = 10,
        command_timeout: float | None = 30.0,
    ) -> None:
        self._dsn = dsn_or_pool if isinstance(dsn_or_pool, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(dsn_or_pool, str) else dsn_or_pool
        self._table, self._columns = table, (id_column, vector_column, text_column)
        self._pool_size, self._timeout = pool_size, command_timeout
        self._kind: str | None = None
        self._dim: int | None = None
        self.skipped_nulls = 0
        table_sql = quote_ident(table)
        id_sql, vec_sql = quote_ident(id_column), quote_ident(vector_column)
        text_sql = f", {quote_ident(text_column)}" if text_column else ""
        self._select = f"SELECT {id_sql}, {{vec}}{text_sql} FROM {table_sql}"
        self._where_ids = f" WHERE {id_sql} = ANY($1::bigint[]) AND {vec_sql} IS NOT NULL"
        self._vec_sql, self._table_sql, self._id_sql = vec_sql, table_sql, id_sql
        self._checked: set[tuple[str, int]] = set()  # conditions check_where has accepted
        self._estimates: dict[tuple[str, tuple[Any, ...]], float] = {}  # planner rows by condition and values

    async def _ready(self) -> asyncpg.Pool:
        """Open the pool and check the table on first use, so errors name the column."""
        if self._pool is None:
            # Connecting waits on the same limit: a server that accepts and
            # never answers is not waited on longer than one that stops
            # answering a statement. With no limit on statements, connecting
            # keeps one (``timeout=None`` would wait on a frozen server for good).
            connect = _CONNECT_SECONDS if self._timeout is None else self._timeout
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, command_timeout=self._timeout, timeout=connect
            )
        if self._kind is None:
            self._kind, self._dim = await self._inspect(self._pool)
        return self._pool

    @contextlib.contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """asyncpg's ``command_timeout`` raises a bare ``asyncio.TimeoutError``
        (before Python 3.11 not even the built-in ``TimeoutError``): a build
        over a frozen server ended in ``TimeoutError()`` with no word of what
        timed out. Raised again as the built-in one, naming the wait."""
        try:
            yield
        except asyncio.TimeoutError as error:
            limit = (
                f"the {_CONNECT_SECONDS:g} s a connection may take (command_timeout=None)"
                if self._timeout is None
                else f"command_timeout={self._timeout:g} s"
            )
            raise TimeoutError(
                f"PostgreSQL did not answer PostgresStore.{what}() on table {self._table!r} within {limit}"
            ) from error

    async def _inspect(self, pool: asyncpg.Pool) -> tuple[str, int | None]:
        relation = await pool.fetchval("SELECT to_regclass($1)::oid", self._table_sql)
        if relation is None:
            raise ValueError(f"table {self._table!r} does not exist")
        types = dict(
            await pool.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                relation,
            )
        )
        for column in self._columns:
            if column is not None and column not in types:
                raise ValueError(f"table {self._table!r} has no column {column!r} (it has {sorted(types)})")
        kind = kind_of(types[self._columns[1]])
        typed_dim = types[self._columns[1]].partition("(")[2].rstrip(")")
        if typed_dim.isdigit():
            return kind, int(typed_dim)
        sample = await pool.fetchval(
            f"SELECT {self._send(kind)} FROM {self._table_sql} WHERE {self._vec_sql} IS NOT NULL LIMIT 1"
        )
        return kind, None if sample is None else decode(kind, [sample]).shape[1]

    def _send(self, kind: str | None = None) -> str:
        send = _SEND.get(kind or self._kind or "")
        return f"{send}({self._vec_sql})" if send else self._vec_sql

    def _rows(self, records: list[Any]) -> Rows:
        """The records that decode as vectors of the table's dimension, and
        the count of the others by reason (``Rows.left_out``): one row of
        another length must not stop a build, nor a query that fetches it."""
        assert self._kind is not None
        blobs = [r[1] for r in records]
        # A bytea or vector row of the expected size is readable: one set, not
        # a call a row, on the rerank fetch of every query. (An array of the
        # expected size may still hold NULLs.)
        size = blob_size(self._kind, self._dim) if self._kind in ("bytea", "vector") and self._dim else None
        if size and None not in blobs and {len(b) for b in blobs} <= {size}:
            return self._decoded(records)
        reasons = [readable(self._kind, self._dim, blob) for blob in blobs]
        if any(reasons):
            left_out = Counter(reason for reason in reasons if reason)
            kept = [r for r, reason in zip(records, reasons) if not reason]
            return dataclasses.replace(self._decoded(kept), left_out=dict(left_out))
        return self._decoded(records)

    def _decoded(self, records: list[Any]) -> Rows:
        assert self._kind is not None
        ids = np.fromiter((r[0] for r in records), dtype=np.int64, count=len(records))
        vectors = decode(self._kind, [r[1] for r in records]) if records else np.empty((0, self._dim or 0), np.float32)
        texts = [r[2] for r in records] if self._columns[2] else None
        return Rows(ids, vectors, texts)

    async def dimension(self) -> int | None:
        """From the column's type modifier (``vector(384)``), else from one row."""
        with self._answering("dimension"):
            await self._ready()
            return self._dim

    async def count(self) -> int:
        """Rows with a vector: what ``LSHRS.index()`` will read."""
        with self._answering("count"):
            pool = await self._ready()
            return int(await pool.fetchval(f"SELECT count(*) FROM {self._table_sql} WHERE {self._vec_sql} IS NOT NULL"))

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        """One ``id = ANY($1)`` round trip; ids the table lacks are absent from the result."""
        with self._answering("fetch"):
            pool = await self._ready()
            query = self._select.format(vec=self._send()) + self._where_ids
            records = await pool.fetch(query, ids.tolist())
            if len(records) < len(ids):  # pragma: no mutate (a debug line only)
                missing = len(ids) - len(records)  # pragma: no mutate
                logger.debug("%d of %d ids are not in %s", missing, len(ids), self._table)  # pragma: no mutate
            return self._rows(records)

    async def passing(self, ids: npt.NDArray[np.int64], where: Any) -> npt.NDArray[np.int64]:
        """Which of ``ids`` the table holds with a vector and ``where`` keeps,
        in one round trip of ids only. Where the planner expects fewer rows to
        pass than there are ``ids``, every passing id is read instead (an
        index on the filtered column serves it): looking up 50,000 candidate
        ids one by one took 110-130 ms at 100k rows. The lookup by ids needs
        no plan for the values (the primary key serves it whatever they
        are), so it runs outside the transaction that forces one: three round
        trips fewer a call."""
        with self._answering("passing"):
            condition, params = _condition(where)
            everything = f"SELECT {self._id_sql} FROM {self._table_sql}{self._passing_only(condition)}"
            if await self._expected_rows(everything, params) < len(ids):
                async with self._planned_for_values() as conn:
                    records = await conn.fetch(everything, [], *params)
                found = np.fromiter((r[0] for r in records), dtype=np.int64, count=len(records))
                return np.intersect1d(ids, found)
            query = f"SELECT {self._id_sql} FROM {self._table_sql}{self._where_ids} AND ({condition})"
            records = await (await self._ready()).fetch(query, ids.tolist(), *params)
            return np.fromiter((r[0] for r in records), dtype=np.int64, count=len(records))

    async def passing_rows(self, where: Any, most: int) -> Rows | None:
        """Every row with a vector that ``where`` keeps, when there are at most
        ``most``: a selective filter is answered exactly from them. None when
        the planner expects more, or more come back (its statistics were
        stale); the query then searches the index."""
        with self._answering("passing_rows"):
            condition, params = _condition(where)
            query = self._select.format(vec=self._send()) + self._passing_only(condition)
            if await self._expected_rows(query, params) > most:
                return None
            async with self._planned_for_values() as conn:
                records = await conn.fetch(f"{query} LIMIT {int(most) + 1}", [], *params)
            return None if len(records) > most else self._rows(records)

    def _passing_only(self, condition: str) -> str:
        """Every row with a vector that ``condition`` keeps. The condition's
        placeholders start at ``$2`` (``_condition``), so ``$1`` is taken by
        an id array that every row passes."""
        return f" WHERE cardinality($1::bigint[]) >= 0 AND {self._vec_sql} IS NOT NULL AND ({condition})"

    @contextlib.asynccontextmanager
    async def _planned_for_values(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection whose statements are planned for their values: a
        filter's selectivity depends on them, and after five runs PostgreSQL
        plans a prepared statement once for any value (measured: a scan of
        the whole table, 70 ms, for a condition that 0.5% of the rows pass)."""
        pool = await self._ready()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            yield conn

    async def _expected_rows(self, query: str, params: tuple[Any, ...]) -> float:
        """The planner's row estimate for ``query``, kept per condition and
        values: a filter used again costs no round trip to decide its path."""
        key = (query, params)
        try:
            return self._estimates[key]
        except (KeyError, TypeError):  # not seen, or unhashable values: ask
            pass
        async with self._planned_for_values() as conn:
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", [], *params)
        rows = float(json.loads(plan)[0]["Plan"]["Plan Rows"])
        with contextlib.suppress(TypeError):
            if len(self._estimates) >= 1024:
                self._estimates.clear()
            self._estimates[key] = rows
        return rows

    async def check_where(self, where: Any) -> None:
        """A filter is a SQL condition on the table's columns, with its values
        bound as ``$1``, ``$2``...: ``("lang = $1 AND year >= $2", "en", 2020)``,
        or a condition alone. The condition is your code, never a user's
        input; values always go as parameters. It is tried once on the table
        (``LIMIT 0``), so an unknown column or a syntax error is a
        ``ValueError`` before any Redis work."""
        with self._answering("check_where"):
            condition, params = _condition(where)
            if (condition, len(params)) in self._checked:
                return
            pool = await self._ready()
            try:
                # The same numbering as a fetch: $1 is the id array, the condition's own start at $2.
                await pool.fetch(
                    f"SELECT 1 FROM {self._table_sql} WHERE $1::bigint[] IS NULL AND ({condition}) LIMIT 0", [], *params
                )
            except asyncpg.PostgresError as exc:  # the server refused the condition: unknown column, syntax, types
                raise ValueError(f"where={where!r} does not apply to table {self._table!r}: {exc}") from None
            except asyncpg.InterfaceError as exc:
                if "argument" not in str(exc):  # not a parameter count: the connection's own trouble
                    raise
                raise ValueError(f"where={where!r}: {exc}") from None
            self._checked.add((condition, len(params)))

    async def sample(self, count: int) -> Rows:
        """About ``count`` random rows with a vector, to fit a learned partition on.

        A table many times larger is sampled by pages (``TABLESAMPLE
        SYSTEM``), reading only that share of it: ``ORDER BY random()``
        sorts every row, vectors and all, and took longer than the 30 s
        command timeout at 6.4M rows (11 GiB)."""
        with self._answering("sample"):
            pool = await self._ready()
            select = self._select.format(vec=self._send())
            rows = await pool.fetchval("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)", self._table_sql)
            if rows is not None and rows >= _SAMPLE_BY_PAGES * count:  # else small, or never analyzed
                query = select + f" TABLESAMPLE SYSTEM ($1) WHERE {self._vec_sql} IS NOT NULL"
                found = self._rows(await pool.fetch(query, 100.0 * count / float(rows)))
                if len(found) > count:
                    keep = np.zeros(len(found), dtype=bool)
                    keep[np.random.default_rng().choice(len(found), count, replace=False)] = True
                    return found.only(keep)
                if len(found) >= count // 2:  # else few, large pages: a page sample is too coarse
                    return found
            query = select + f" WHERE {self._vec_sql} IS NOT NULL ORDER BY random() LIMIT $1"
            return self._rows(await pool.fetch(query, count))

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        """The whole table through a server-side cursor, ``batch_size`` rows at a time."""
        with self._answering("batches"):
            pool = await self._ready()
            self.skipped_nulls = 0
            query = self._select.format(vec=self._send())
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                cursor = await conn.cursor(query)
                while records := await cursor.fetch(batch_size):
                    rows = self._rows(records)
                    self.skipped_nulls += rows.left_out.get(NULL_VECTOR, 0)
                    yield rows
        if self.skipped_nulls:
            logger.warning("skipped %d rows of %s with a NULL vector", self.skipped_nulls, self._table)

    async def close(self) -> None:
        """Close the pool if this store opened it."""
        if self._dsn is not None and self._pool is not None:
            await self._pool.close()
            self._pool = None


def _condition(where: Any) -> tuple[str, tuple[Any, ...]]:
    """A filter's SQL, its placeholders moved up by one (``$1`` is the id
    array of a fetch), and its parameters."""
    if isinstance(where, str):
        condition, params = where, ()
    elif isinstance(where, tuple) and where and isinstance(where[0], str):
        condition, params = where[0], tuple(where[1:])
    else:
        raise TypeError(
            "PostgresStore takes where= as a SQL condition, alone or in a tuple with its parameters: "
            f"('lang = $1', 'en'); got {type(where).__name__}"
        )
    shifted = re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + 1}", condition)
    return shifted, params
