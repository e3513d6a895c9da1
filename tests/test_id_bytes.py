"""Ids stored in 4 bytes (the default) or 8: the width is part of the stored
configuration, an id that does not fit is refused before anything is
written, and one is never taken for another id that shares its low 4 bytes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from conftest import clustered, index_state, keyspace
from lshrs._config import IndexConfig
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio

DIM = 32
BASE = clustered(300, DIM, seed=21)


async def test_an_index_of_8_byte_ids_holds_any_64_bit_id(make_lsh: Any, raw_redis: Any) -> None:
    ids = np.arange(300, dtype=np.int64)
    # Every byte of an id picks its record group: ids whose third and fourth bytes differ too.
    ids[:8] = [-(2**63), -5, 2**32 + 100, 2**63 - 1, 2**40, 70_000, 2**24 + 2**16, 3 * 2**48 + 2**17]
    lsh = await make_lsh(dim=DIM, store=InMemoryStore(), id_bytes=8)
    assert lsh.config.id_bytes == 8
    await lsh.index(ids, BASE)
    assert set(await index_state(raw_redis, lsh)) == set(ids.tolist())  # 8-byte fields and bucket entries
    for row in range(8):
        assert (await lsh.query(BASE[row], top_k=1))[0].id == ids[row]
    assert await lsh.delete([2**32 + 100, 100]) == 2
    assert set(await index_state(raw_redis, lsh)) == set(ids.tolist()) - {2**32 + 100, 100}


async def test_4_byte_ids_that_do_not_fit_are_refused_and_never_taken_for_others(make_lsh: Any, raw_redis: Any) -> None:
    store = InMemoryStore()
    lsh = await make_lsh(dim=DIM, store=store)
    assert lsh.config.id_bytes == 4
    await lsh.index(np.arange(300), BASE)
    assert set(await index_state(raw_redis, lsh)) == set(range(300))  # 4-byte fields and bucket entries
    before = await keyspace(raw_redis)
    # 2**32 + 100 and 100 share their low 4 bytes; -1 is 0xffffffff.
    assert await lsh.delete([2**32 + 100, -1]) == 0
    assert await keyspace(raw_redis) == before
    assert (await lsh.query(BASE[100], top_k=1))[0].id == 100
    # A row the store holds and the index cannot: a filtered query ranks the
    # few rows that pass exactly, keeping those the index holds.
    await store.put(np.array([2**32 + 100]), BASE[100:101])
    assert await lsh.query(BASE[100], where={2**32 + 100}) == []
    assert [h.id for h in await lsh.query(BASE[100], top_k=1, where={100, 2**32 + 100})] == [100]
    # Such a row stops a build from the store, naming the way out.
    with pytest.raises(ValueError, match=r"id 4294967396 does not fit .* id_bytes=8"):
        await lsh.index()
    assert set(await index_state(raw_redis, lsh)) == set(range(300))
    # The widest id that fits, 0xffffffff, is indexed, found and deleted like any other.
    await lsh.ingest(2**32 - 1, BASE[7])
    assert set(await index_state(raw_redis, lsh)) == {*range(300), 2**32 - 1}
    assert sorted(h.id for h in await lsh.query(BASE[7], top_k=2, where={7, 2**32 - 1})) == [7, 2**32 - 1]
    assert await lsh.delete([2**32 - 1]) == 1
    assert set(await index_state(raw_redis, lsh)) == set(range(300))


async def test_the_id_width_is_stored_and_adopted(make_lsh: Any) -> None:
    short = await make_lsh(dim=DIM, prefix="short")
    long = await make_lsh(dim=DIM, prefix="long", id_bytes=8)
    assert (await make_lsh(dim=DIM, prefix="short")).config.id_bytes == 4
    assert (await make_lsh(dim=DIM, prefix="long")).config.id_bytes == 8
    with pytest.raises(ValueError, match="id_bytes: given 8, stored 4"):
        await make_lsh(dim=DIM, prefix="short", id_bytes=8)
    # A client before 4-byte ids refuses layout 3; one before spilled records, layout 4.
    assert (short.config.layout, long.config.layout) == ((4, 4) if short.config.spill else (3, 2))


def test_a_configuration_stored_before_id_width_holds_8_byte_ids() -> None:
    old = {"dim": 8, "num_bands": 0, "rows_per_band": 0, "seed": 0, "shards": 1, "layout": 2, "hashing": "kmeans"}
    assert IndexConfig.from_json(json.dumps(old)).id_bytes == 8
    for layout, id_bytes, spill in ((3, 8, 0), (2, 4, 0), (3, 6, 0), (3, 4, 1), (4, 4, 0), (4, 8, 2)):
        with pytest.raises(ValueError, match="unknown to this lshrs version"):
            IndexConfig.from_json(json.dumps({**old, "layout": layout, "id_bytes": id_bytes, "spill": spill}))
    for id_bytes in (4, 8):
        assert IndexConfig.from_json(json.dumps({**old, "layout": 4, "id_bytes": id_bytes, "spill": 1})).spill == 1


async def test_a_first_batch_with_an_id_that_does_not_fit_trains_nothing(make_lsh: Any, raw_redis: Any) -> None:
    """Refused before the partition is fitted and stored, not at the write after it."""
    lsh = await make_lsh(dim=DIM, store=InMemoryStore(), hashing="kmeans")
    before = await keyspace(raw_redis)
    with pytest.raises(ValueError, match="id 4294967296 does not fit"):
        await lsh.index([*range(299), 2**32], BASE)
    assert await keyspace(raw_redis) == before
