"""A per-process cache of signatures, so a warm query asks Redis for ids only.

Reading thousands of candidate signatures costs Redis about a microsecond
each, far more than the bucket union; yet signatures change only when an id is
replaced or deleted. Each shard keeps a generation counter that those two
operations bump (fresh inserts do not), and every query reads it in the same
script as the buckets: a cached shard whose generation moved is dropped whole.
So a cached signature is never used after Redis changed it, and a stale cache
can only cost a refetch, never a wrong answer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]


class _Sorted:
    """Ids in ascending order with their signatures; a later id wins on merge."""

    def __init__(self, ids: IdArray, signatures: ByteArray) -> None:
        latest = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
        self.ids, self.signatures = ids[latest], signatures[latest]

    def find(self, ids: IdArray) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
        if not len(self.ids):
            return np.zeros(len(ids), bool), np.zeros(len(ids), np.intp)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[at] == ids, at


class _Shard:
    """A large sorted tier and a small one for recent additions, merged when the
    small one passes an eighth of the large: amortised O(1) per added id."""

    def __init__(self, width: int) -> None:
        self.generation: int | None = None
        self.shard_size = 0  # ids in the shard when Redis last said
        self.main = _Sorted(np.empty(0, np.int64), np.empty((0, width), np.uint8))
        self.recent = self.main
        self.pending: list[tuple[IdArray, ByteArray]] = []

    def __len__(self) -> int:
        return len(self.main.ids) + len(self.recent.ids) + sum(len(ids) for ids, _ in self.pending)

    def settle(self) -> None:
        if not self.pending:
            return
        ids = np.concatenate([self.recent.ids, *(i for i, _ in self.pending)])
        sigs = np.concatenate([self.recent.signatures, *(s for _, s in self.pending)])
        self.pending.clear()
        self.recent = _Sorted(ids, sigs)
        if len(self.recent.ids) > max(4096, len(self.main.ids) // 8):
            self.main = _Sorted(
                np.concatenate([self.main.ids, self.recent.ids]),
                np.concatenate([self.main.signatures, self.recent.signatures]),
            )
            self.recent = _Sorted(self.recent.ids[:0], self.recent.signatures[:0])


class SignatureCache:
    """At most ``capacity`` signatures per shard; a full shard starts over."""

    def __init__(self, shards: int, width: int, capacity: int) -> None:
        self._width = width
        self._capacity = capacity
        self._shards = [_Shard(width) for _ in range(shards)]

    def is_warm(self, shard: int) -> bool:
        """Whether the cache holds most of the shard (or all it may hold): then a
        query asks Redis for ids only and fetches the few missing signatures."""
        cached = self._shards[shard]
        wanted = min(0.9 * cached.shard_size, 0.9 * self._capacity)
        return self._capacity > 0 and cached.generation is not None and len(cached) >= max(wanted, 1)

    def observe(self, shard: int, generation: int, shard_size: int) -> None:
        """The shard's generation and size as Redis just reported them; a new
        generation drops the cached shard."""
        cached = self._shards[shard]
        if cached.generation != generation:
            cached = self._shards[shard] = _Shard(self._width)
            cached.generation = generation
        cached.shard_size = shard_size

    def add(self, shard: int, ids: IdArray, signatures: ByteArray) -> None:
        if self._capacity <= 0 or not len(ids):
            return
        cached = self._shards[shard]
        if len(cached) + len(ids) > self._capacity:
            generation, size = cached.generation, cached.shard_size
            cached = self._shards[shard] = _Shard(self._width)
            cached.generation, cached.shard_size = generation, size
        cached.pending.append((ids.copy(), signatures.copy()))

    def lookup(self, shard: int, ids: IdArray) -> tuple[ByteArray, npt.NDArray[np.bool_]]:
        """Signatures of ``ids`` (zeros where missing) and the mask of the missing."""
        cached = self._shards[shard]
        cached.settle()
        signatures = np.zeros((len(ids), self._width), np.uint8)
        found = np.zeros(len(ids), bool)
        for tier in (cached.recent, cached.main):  # recent first: it is newer
            hit, at = tier.find(ids)
            hit &= ~found
            signatures[hit] = tier.signatures[at[hit]]
            found |= hit
        return signatures, ~found
