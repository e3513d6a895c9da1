"""The ``LSHRS_*`` environment settings the examples share with the ``lshrs``
command, and the warm index both services open from them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from lshrs import LSHRS
from lshrs.adapters import PostgresStore


@dataclass(frozen=True)
class Settings:
    redis_url: str
    prefix: str
    dsn: str
    table: str
    vector_column: str = "embedding"
    text_column: str | None = "body"


def from_environment() -> Settings:
    """The settings, or a ``RuntimeError`` that names every missing variable,
    so a service fails at start-up rather than on its first request."""
    needed = {"LSHRS_POSTGRES_DSN": "the PostgreSQL DSN", "LSHRS_TABLE": "the table with the vectors"}
    missing = [f"{name} ({what})" for name, what in needed.items() if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"set {' and '.join(missing)}; "
            "LSHRS_REDIS_URL, LSHRS_PREFIX, LSHRS_VECTOR_COLUMN and LSHRS_TEXT_COLUMN are optional"
        )
    return Settings(
        redis_url=os.environ.get("LSHRS_REDIS_URL", "redis://localhost:6379/0"),
        prefix=os.environ.get("LSHRS_PREFIX", "lshrs"),
        dsn=os.environ["LSHRS_POSTGRES_DSN"],
        table=os.environ["LSHRS_TABLE"],
        vector_column=os.environ.get("LSHRS_VECTOR_COLUMN", "embedding"),
        text_column=os.environ.get("LSHRS_TEXT_COLUMN", "body") or None,
    )


@asynccontextmanager
async def open_index(settings: Settings) -> AsyncIterator[LSHRS]:
    """The index over the settings' table, its signatures loaded once so
    that even the first queries read only bucket ids; closed on exit."""
    store = PostgresStore(
        settings.dsn, table=settings.table, vector_column=settings.vector_column, text_column=settings.text_column
    )
    dim = await store.dimension()
    if dim is None:
        raise RuntimeError(f"table {settings.table!r} holds no vectors yet")
    async with LSHRS(dim=dim, redis_url=settings.redis_url, prefix=settings.prefix, store=store) as lsh:
        await lsh.warm()
        yield lsh
