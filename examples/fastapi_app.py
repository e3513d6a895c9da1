"""A search service over an existing PostgreSQL table, with FastAPI.

    pip install 'lshrs[fastapi]'
    LSHRS_POSTGRES_DSN=postgresql://localhost/wiki LSHRS_TABLE=passages \\
        uvicorn examples.fastapi_app:app

Settings are the ``LSHRS_*`` variables the ``lshrs`` command reads
(``examples/settings.py``); a missing one stops the service at start-up
with its name.

It embeds nothing itself: search by the id of a row (``GET /search?id=42``)
or by a vector (``POST /search``). ``POST /documents`` indexes a row the
caller has written to the table; ``DELETE /documents/{id}`` forgets one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lshrs import Hit, Overloaded

try:
    from .settings import Settings, from_environment, open_index
except ImportError:  # run as a script, or imported with examples/ on the path
    from settings import Settings, from_environment, open_index  # type: ignore[no-redef]


class VectorQuery(BaseModel):
    vector: list[float]
    top_k: int = 10


class Document(BaseModel):
    id: int
    vector: list[float] | None = None  # default: read the row's vector from the table


def _hits(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{"id": h.id, "score": h.score, "text": h.text} for h in hits]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; without ``settings``, they are read from the environment at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_index(settings or from_environment()) as lsh:
            app.state.lsh, app.state.store = lsh, lsh.store
            yield

    app = FastAPI(title="lshrs search", lifespan=lifespan)

    @app.exception_handler(TimeoutError)
    async def late(request: Request, exc: Exception) -> JSONResponse:
        # A call past its deadline, or refused by an overloaded client: the
        # caller should retry shortly; neither is a bug of this service.
        status = 503 if isinstance(exc, Overloaded) else 504
        return JSONResponse({"detail": str(exc)}, status_code=status, headers={"Retry-After": "1"})

    async def row_vector(request: Request, id_: int) -> np.ndarray:
        rows = await request.app.state.store.fetch(np.array([id_], dtype=np.int64))
        if not len(rows):
            raise HTTPException(404, f"row {id_} is not in the table (or its vector is NULL)")
        return rows.vectors[0]  # type: ignore[no-any-return]

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        # lshrs refuses bad input (a wrong dimension, NaN, top_k=0) with
        # ValueError or TypeError, before any work; so does FastAPI a missing
        # or malformed parameter. Either is the caller's: 400, saying what.
        detail = exc.errors() if isinstance(exc, RequestValidationError) else str(exc)
        return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=400)

    @app.get("/search")
    async def search_by_id(request: Request, id: int, top_k: int = 10) -> list[dict[str, Any]]:
        return _hits(await request.app.state.lsh.query(await row_vector(request, id), top_k=top_k))

    @app.post("/search")
    async def search_by_vector(request: Request, body: VectorQuery) -> list[dict[str, Any]]:
        return _hits(await request.app.state.lsh.query(body.vector, top_k=body.top_k))

    @app.post("/documents", status_code=201)
    async def add_document(request: Request, document: Document) -> dict[str, int]:
        vector = document.vector if document.vector is not None else await row_vector(request, document.id)
        await request.app.state.lsh.ingest(document.id, vector)
        return {"id": document.id}

    @app.delete("/documents/{id}")
    async def delete_document(request: Request, id: int) -> dict[str, int]:
        return {"deleted": await request.app.state.lsh.delete([id])}

    @app.post("/index")
    async def rebuild(request: Request) -> dict[str, int]:
        return {"indexed": await request.app.state.lsh.index()}

    return app


app = create_app()
