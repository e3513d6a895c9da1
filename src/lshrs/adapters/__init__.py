"""Vector stores. ``InMemoryStore`` needs nothing extra; the others import their
driver only when used (``pip install 'lshrs[postgres]'`` or ``'lshrs[sqlalchemy]'``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._memory import InMemoryStore

if TYPE_CHECKING:
    from ._postgres import PostgresStore
    from ._redis import RedisStore
    from ._sqlalchemy import SQLAlchemyStore

__all__ = ["InMemoryStore", "PostgresStore", "RedisStore", "SQLAlchemyStore"]

_LAZY = {"PostgresStore": "_postgres", "RedisStore": "_redis", "SQLAlchemyStore": "_sqlalchemy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
