"""The same search over a PostgreSQL table with aiohttp, in a few lines:
``GET /search?id=42&top_k=5``. Run: ``python examples/aiohttp_app.py DSN TABLE``."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import numpy as np
from aiohttp import web

from lshrs import LSHRS
from lshrs.adapters import PostgresStore

LSH = web.AppKey("lsh", LSHRS)


def create_app(*, redis_url: str, dsn: str, table: str, text_column: str | None = "body") -> web.Application:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        store = PostgresStore(dsn, table=table, text_column=text_column)
        async with LSHRS(dim=await store.dimension() or 0, redis_url=redis_url, store=store) as lsh:
            await lsh.warm()  # load the signatures once, so even the first queries read only ids
            app[LSH] = lsh
            yield

    async def search(request: web.Request) -> web.Response:
        lsh = request.app[LSH]
        rows = await lsh.store.fetch(np.array([int(request.query["id"])], dtype=np.int64))  # type: ignore[union-attr]
        if not len(rows):
            raise web.HTTPNotFound(text="no such row")
        hits = await lsh.query(rows.vectors[0], top_k=int(request.query.get("top_k", 10)))
        return web.json_response([{"id": h.id, "score": h.score, "text": h.text} for h in hits])

    app = web.Application()
    app.cleanup_ctx.append(lifespan)
    app.router.add_get("/search", search)
    return app


if __name__ == "__main__":
    web.run_app(create_app(redis_url="redis://localhost:6379/0", dsn=sys.argv[1], table=sys.argv[2]))
