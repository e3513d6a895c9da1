"""``RedisStore``: float32 blobs in Redis, for teams that want one system.
lshrs owns it: index/ingest/delete keep it in step with the index."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._connect import check_client, connect
from .._index import Client
from .._types import Rows


class RedisStore:
    """Vectors in ``groups`` hashes (id -> little-endian float32 bytes), texts
    beside them. Each group is one hash tag, so a cluster spreads the groups
    over its nodes and a fetch is one pipeline."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: Any = None,
        prefix: str = "lshrs-vectors",
        groups: int = 16,
        timeout: float | None = 10.0,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._url = redis_url or "redis://localhost:6379/0"
        self._given = check_client(redis) if redis is not None else None
        self._client: Client | None = self._given
        self._prefix, self._groups, self._timeout = prefix, groups, timeout
        self._options = dict(redis_options or {})

    async def _ready(self) -> Client:
        if self._client is None:
            self._client = await connect(self._url, self._timeout, self._options)
        return self._client

    def _keys(self, group: int) -> tuple[str, str]:
        return f"{{{self._prefix}:{group}}}:v", f"{{{self._prefix}:{group}}}:t"

    def _by_group(self, ids: npt.NDArray[np.int64]) -> list[npt.NDArray[np.intp]]:
        group_of = np.mod(ids, self._groups)
        return [np.flatnonzero(group_of == g) for g in range(self._groups)]

    async def dimension(self) -> int | None:
        """Recorded on the first write; None while empty."""
        raw = await (await self._ready()).get(f"{{{self._prefix}}}:dim")
        return None if raw is None else int(raw)

    async def count(self) -> int:
        """How many vectors the store holds."""
        client = await self._ready()
        return int(sum([await client.hlen(self._keys(g)[0]) for g in range(self._groups)]))

    async def put(
        self,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        texts: Sequence[str | None] | None = None,
    ) -> None:
        """Insert or replace vectors and texts in one pipeline."""
        client = await self._ready()
        await client.set(f"{{{self._prefix}}}:dim", vectors.shape[1], nx=True)
        blobs = vectors.astype("<f4", copy=False)
        pipe = client.pipeline(transaction=False)
        for group, rows in enumerate(self._by_group(ids)):
            if len(rows):
                vec_key, text_key = self._keys(group)
                pipe.hset(vec_key, mapping={int(ids[r]): blobs[r].tobytes() for r in rows})
                given = {int(ids[r]): texts[r] for r in rows if texts is not None and texts[r] is not None}
                gone = [int(ids[r]) for r in rows if int(ids[r]) not in given]
                if given:
                    pipe.hset(text_key, mapping=given)  # type: ignore[arg-type]
                if gone:
                    pipe.hdel(text_key, *gone)
        await pipe.execute()

    async def remove(self, ids: npt.NDArray[np.int64]) -> None:
        """Delete vectors and texts; unknown ids are ignored."""
        client = await self._ready()
        pipe = client.pipeline(transaction=False)
        for group, rows in enumerate(self._by_group(ids)):
            if len(rows):
                members = [int(ids[r]) for r in rows]
                for key in self._keys(group):
                    pipe.hdel(key, *members)
        await pipe.execute()

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        """The vectors and texts of ``ids`` that exist, in one pipeline."""
        client = await self._ready()
        pipe = client.pipeline(transaction=False)
        groups = [(g, rows) for g, rows in enumerate(self._by_group(ids)) if len(rows)]
        for group, rows in groups:
            members = [int(ids[r]) for r in rows]
            pipe.hmget(self._keys(group)[0], members)
            pipe.hmget(self._keys(group)[1], members)
        replies = await pipe.execute()
        found: list[int] = []
        blobs: list[bytes] = []
        texts: list[str | None] = []
        for (_, rows), vectors, words in zip(groups, replies[::2], replies[1::2]):
            for row, blob, text in zip(rows, vectors, words):
                if blob is not None:
                    found.append(int(ids[row]))
                    blobs.append(blob)
                    texts.append(_text(text))
        return _rows(found, blobs, texts)

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        """Every vector, by HSCAN of each group."""
        client = await self._ready()
        for group in range(self._groups):
            vec_key, text_key = self._keys(group)
            found: list[int] = []
            blobs: list[bytes] = []
            async for id_, blob in client.hscan_iter(vec_key, count=batch_size):
                found.append(int(id_))
                blobs.append(blob)
                if len(found) >= batch_size:
                    yield await self._with_texts(client, text_key, found, blobs)
                    found, blobs = [], []
            if found:
                yield await self._with_texts(client, text_key, found, blobs)

    async def _with_texts(self, client: Client, key: str, found: list[int], blobs: list[bytes]) -> Rows:
        words = await client.hmget(key, found)  # type: ignore[arg-type,unused-ignore]
        return _rows(found, blobs, [_text(w) for w in words])

    async def drop(self) -> None:
        """Delete every vector and text of this store."""
        client = await self._ready()
        for group in range(self._groups):
            await client.delete(*self._keys(group))
        await client.delete(f"{{{self._prefix}}}:dim")

    async def close(self) -> None:
        """Close the client if this store opened it."""
        if self._client is not None and self._client is not self._given:
            await self._client.aclose()
        self._client = self._given


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _rows(ids: list[int], blobs: list[bytes], texts: list[str | None]) -> Rows:
    if not ids:
        return Rows(np.empty(0, np.int64), np.empty((0, 0), np.float32), [])
    vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), -1).astype(np.float32)
    return Rows(np.asarray(ids, dtype=np.int64), vectors, texts)
