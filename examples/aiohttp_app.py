"""The same search over a PostgreSQL table with aiohttp, in a few lines:
``GET /search?id=42&top_k=5``.

    pip install 'lshrs[aiohttp]'
    LSHRS_POSTGRES_DSN=postgresql://localhost/wiki LSHRS_TABLE=passages python examples/aiohttp_app.py

Settings are the ``LSHRS_*`` variables the ``lshrs`` command reads
(``examples/settings.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from aiohttp import web

from lshrs import LSHRS, Overloaded

try:
    from .settings import Settings, from_environment, open_index
except ImportError:  # run as a script, or imported with examples/ on the path
    from settings import Settings, from_environment, open_index  # type: ignore[no-redef]

LSH = web.AppKey("lsh", LSHRS)


def _int(request: web.Request, name: str, default: int | None = None, least: int = 0) -> int:
    """A query parameter as an integer, or a 400 that says what is wrong with it."""
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"the query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer, got {raw!r}") from None
    if value < least:
        raise web.HTTPBadRequest(text=f"{name} must be at least {least}, got {value}")
    return value


def create_app(settings: Settings | None = None) -> web.Application:
    """The service; without ``settings``, they are read from the environment."""
    config = settings or from_environment()

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with open_index(config) as lsh:
            app[LSH] = lsh
            yield

    async def search(request: web.Request) -> web.Response:
        lsh = request.app[LSH]
        id_, top_k = _int(request, "id"), _int(request, "top_k", 10, least=1)
        assert lsh.store is not None
        rows = await lsh.store.fetch(np.array([id_], dtype=np.int64))
        if not len(rows):
            raise web.HTTPNotFound(text=f"row {id_} is not in the table (or its vector is NULL)")
        try:
            hits = await lsh.query(rows.vectors[0], top_k=top_k)
        except TimeoutError as exc:  # late, or refused by an overloaded client: retry shortly
            status = web.HTTPServiceUnavailable if isinstance(exc, Overloaded) else web.HTTPGatewayTimeout
            raise status(text=str(exc), headers={"Retry-After": "1"}) from exc
        return web.json_response([{"id": h.id, "score": h.score, "text": h.text} for h in hits])

    app = web.Application()
    app.cleanup_ctx.append(lifespan)
    app.router.add_get("/search", search)
    return app


if __name__ == "__main__":
    web.run_app(create_app())
