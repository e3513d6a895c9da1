"""``SQLAlchemyStore``: an existing table in any database SQLAlchemy 2.0 reaches
through an async engine (PostgreSQL, SQLite, MySQL, ...); read, never written."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import NULL_VECTOR, Rows

try:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("SQLAlchemyStore needs SQLAlchemy: pip install 'lshrs[sqlalchemy]'") from exc


class SQLAlchemyStore:
    """Rows of ``table`` through SQLAlchemy Core.

    The vector column may hold little-endian float32 bytes (``LargeBinary``,
    ``bytea``, ``BLOB``), a numeric array (PostgreSQL ``ARRAY``) or pgvector's
    text form. ``engine_or_url`` is an ``AsyncEngine`` (left open) or a URL
    such as ``sqlite+aiosqlite:///file.db`` (the store disposes its engine).
    """

    def __init__(
        self,
        engine_or_url: str | AsyncEngine,
        *,
        table: str,
        id_column: str = "id",
        vector_column: str = "embedding",
        text_column: str | None = None,
        schema: str | None = None,
    ) -> None:
        self._owns_engine = isinstance(engine_or_url, str)
        self._engine = create_async_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
        self._names = (table, id_column, vector_column, text_column, schema)
        self._table: sa.Table | None = None
        self._dim: int | None = None
        self.skipped_nulls = 0

    async def _ready(self) -> sa.Table:
        """Reflect the table once, so a wrong table or column fails early and clearly."""
        if self._table is not None:
            return self._table
        name, id_column, vector_column, text_column, schema = self._names

        def reflect(sync_conn: Any) -> sa.Table:
            if not sa.inspect(sync_conn).has_table(name, schema=schema):
                raise ValueError(f"table {name!r} does not exist")
            with warnings.catch_warnings():
                # A pgvector column without pgvector's SQLAlchemy type: its
                # values come back as text, which lshrs decodes itself.
                warnings.filterwarnings("ignore", "Did not recognize type", sa.exc.SAWarning)
                return sa.Table(name, sa.MetaData(), autoload_with=sync_conn, schema=schema)

        async with self._engine.connect() as conn:
            table = await conn.run_sync(reflect)
            for column in (id_column, vector_column, text_column):
                if column is not None and column not in table.c:
                    raise ValueError(f"table {name!r} has no column {column!r} (it has {sorted(table.c.keys())})")
            sample = (
                await conn.execute(
                    sa.select(table.c[vector_column]).where(table.c[vector_column].is_not(None)).limit(1)
                )
            ).scalar()
        self._table = table
        self._dim = None if sample is None else len(_decode([sample])[0])
        return table

    def _select(self, table: sa.Table) -> sa.Select[Any]:
        _, id_column, vector_column, text_column, _ = self._names
        columns = [table.c[id_column], table.c[vector_column]]
        if text_column:
            columns.append(table.c[text_column])
        return sa.select(*columns).where(table.c[vector_column].is_not(None))

    def _rows(self, records: Sequence[Any]) -> Rows:
        """The records whose vector has the table's dimension; the others
        counted in ``Rows.left_out``, so one bad row stops neither a build nor
        a query that fetches it."""
        wrong = [r for r in records if self._dim is not None and _length(r[1]) != self._dim]
        if wrong:
            records = [r for r in records if _length(r[1]) == self._dim]
        ids = np.fromiter((r[0] for r in records), dtype=np.int64, count=len(records))
        texts = [r[2] for r in records] if self._names[3] else None
        vectors = _decode([r[1] for r in records]) if records else np.empty((0, self._dim or 0), np.float32)
        return Rows(ids, vectors, texts, {"wrong dimension": len(wrong)} if wrong else {})

    async def dimension(self) -> int | None:
        """Read from one row; None while the table has no vectors."""
        await self._ready()
        return self._dim

    async def count(self) -> int:
        """Rows with a vector: what ``LSHRS.index()`` will read."""
        table = await self._ready()
        vector = table.c[self._names[2]]
        async with self._engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).where(vector.is_not(None)))).scalar_one())

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        """One ``WHERE id IN (...)`` query; ids the table lacks are absent."""
        table = await self._ready()
        query = self._select(table).where(table.c[self._names[1]].in_(ids.tolist()))
        async with self._engine.connect() as conn:
            return self._rows((await conn.execute(query)).all())

    async def passing(self, ids: npt.NDArray[np.int64], where: Any) -> npt.NDArray[np.int64]:
        """Which of ``ids`` the table holds with a vector and ``where`` keeps: ids only."""
        table = await self._ready()
        id_column, vector_column = table.c[self._names[1]], table.c[self._names[2]]
        query = sa.select(id_column).where(id_column.in_(ids.tolist()), vector_column.is_not(None), where)
        async with self._engine.connect() as conn:
            found = (await conn.execute(query)).scalars().all()
        return np.fromiter(found, dtype=np.int64, count=len(found))

    async def check_where(self, where: Any) -> None:
        """A filter is a SQLAlchemy boolean expression over the table's
        columns, by name (``sa.column("lang") == "en"``) or from a table
        object; SQLAlchemy binds its values. A column the table lacks, or
        anything that is not an expression, is refused before any Redis work."""
        if not isinstance(where, sa.ColumnElement):
            raise TypeError(
                "SQLAlchemyStore takes where= as a SQLAlchemy expression such as sa.column('lang') == 'en', "
                f"got {type(where).__name__}"
            )
        table = await self._ready()
        for element in sa.sql.visitors.iterate(where):
            if isinstance(element, sa.ColumnClause) and element.name not in table.c:
                raise ValueError(f"where= names column {element.name!r}, which table {self._names[0]!r} lacks")

    async def sample(self, count: int) -> Rows:
        """``count`` random rows with a vector, to fit a learned partition on."""
        table = await self._ready()
        async with self._engine.connect() as conn:
            result = await conn.execute(self._select(table).order_by(sa.func.random()).limit(count))
            return self._rows(result.all())

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        """The whole table as a server-side stream, ``batch_size`` rows at a time."""
        table = await self._ready()
        vector = table.c[self._names[2]]
        async with self._engine.connect() as conn:
            self.skipped_nulls = int(
                (await conn.execute(sa.select(sa.func.count()).where(vector.is_(None)))).scalar_one()
            )
            result = await conn.stream(self._select(table).execution_options(yield_per=batch_size))
            nulls = {NULL_VECTOR: self.skipped_nulls} if self.skipped_nulls else {}
            async for part in result.partitions(batch_size):
                rows = self._rows(part)
                yield dataclasses.replace(rows, left_out={**rows.left_out, **nulls})
                nulls = {}  # counted once, with the first batch
            if nulls:
                yield Rows(np.empty(0, np.int64), np.empty((0, self._dim or 0), np.float32), left_out=nulls)

    async def close(self) -> None:
        """Dispose of the engine if this store created it."""
        if self._owns_engine:
            await self._engine.dispose()


def _length(value: Any) -> int:
    """Elements of one vector as the driver returns it (see :func:`_decode`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        size = len(bytes(value))
        return size // 4 if size % 4 == 0 else -1
    if isinstance(value, str):
        return value.count(",") + 1
    return len(value)


def _decode(values: Sequence[Any]) -> npt.NDArray[np.float32]:
    """Bytes as little-endian float32, sequences as numbers, pgvector text '[1,2]'."""
    if not values:
        return np.empty((0, 0), np.float32)
    first = values[0]
    if isinstance(first, (bytes, bytearray, memoryview)):
        return (
            np.frombuffer(b"".join(bytes(v) for v in values), dtype="<f4").reshape(len(values), -1).astype(np.float32)
        )
    if isinstance(first, str):
        return np.array([np.array(v.strip("[]").split(","), dtype=np.float32) for v in values], dtype=np.float32)
    return np.asarray(values, dtype=np.float32).reshape(len(values), -1)
