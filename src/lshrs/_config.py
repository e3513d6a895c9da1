"""Index configuration: defaults, the banding model, and its stored JSON form."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields

#: Bump when the Redis layout changes incompatibly. Layout 3 is layout 2 with
#: 4-byte ids (``id_bytes``); this version reads both.
LAYOUT_VERSION = 2
LAYOUT_SHORT_IDS = 3
#: Layout 4: a learned index whose records hold a second bucket (``spill``),
#: with ids of either width. A client that predates it refuses the index
#: rather than read its records' second bucket number as code bytes.
LAYOUT_SPILLED = 4
#: The ids a 4-byte index holds are 0 to this.
MAX_SHORT_ID = 2**32 - 1
#: Bytes a new index stores an id in, in each bucket and record. Four fit
#: every serial key a table of billions of rows hands out and save 8 bytes a
#: vector of Redis (a bucket entry and a record's field); an index of
#: negative or larger ids is built with ``id_bytes=8``.
DEFAULT_ID_BYTES = 4

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_BANDS = 48
_MIN_BANDS = 8
_MAX_ROWS = 20


def choose_rows(expected_size: int) -> int:
    """Rows per band grow with log2 of the corpus, so a bucket holds about the
    same number of ids (2**5 = 32 for uniform data) whatever the size. Measured
    at 100k real sentence embeddings, 48 bands, recall@10 0.95: 12 rows (32 a
    bucket) took 6.5 ms a query, 10 rows 7.4 ms (bigger buckets), 14 rows 8.1
    ms (more, emptier buckets to read)."""
    return min(_MAX_ROWS, max(8, round(math.log2(max(expected_size, 2))) - 5))


def choose_bands(threshold: float, rows: int, target: float = 0.9) -> int:
    """Fewest bands for which a neighbour at cosine ``threshold`` shares at least
    one band with the query with probability ``target`` (random hyperplanes:
    one bit agrees with p = 1 - theta/pi, a band with p**rows, some band with
    1 - (1 - p**rows)**bands). Multi-probe raises the real figure above this."""
    p = 1.0 - math.acos(threshold) / math.pi
    band_hit = p**rows
    bands = math.ceil(math.log(1.0 - target) / math.log(1.0 - band_hit))
    return min(_MAX_BANDS, max(_MIN_BANDS, bands))


def collision_probability(cosine: float, rows: int, bands: int) -> float:
    """Chance that a vector at ``cosine`` to the query lands in a shared bucket."""
    p = 1.0 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi
    return 1.0 - (1.0 - p**rows) ** bands


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"prefix {prefix!r} is not allowed: use 1-64 characters from "
            "letters, digits, '_', '-' and '.' (no braces, spaces or ':')"
        )
    return prefix


#: The hash families: learned k-means buckets (the default) and random hyperplanes.
HASHINGS = ("kmeans", "hyperplane")


@dataclass(frozen=True)
class IndexConfig:
    """What two clients must agree on to share an index. Stored as JSON in Redis.

    ``num_bands`` and ``rows_per_band`` shape the hyperplane family (0 for
    k-means); ``code_bytes`` is the learned family's pre-ranking sketch, a
    product-quantised code (:mod:`._codes`; 0 for hyperplanes, whose bands
    are their sketch). A learned index stored before codes existed has
    ``sketch_bits`` of SimHash instead, and one stored before ``hashing``
    existed is a hyperplane index."""

    dim: int
    num_bands: int
    rows_per_band: int
    seed: int
    shards: int
    layout: int = LAYOUT_VERSION
    hashing: str = "hyperplane"
    sketch_bits: int = 0
    code_bytes: int = 0
    id_bytes: int = 8  # what an index stored before the field holds
    spill: int = 0  # learned: second buckets an id is filed in (0 or 1)

    def __post_init__(self) -> None:
        known = self.id_bytes in (4, 8) and self.spill in (0, 1)
        if not known or self.layout != layout_of(self.id_bytes, self.spill):
            raise ValueError(
                f"the stored index has layout {self.layout} with {self.id_bytes}-byte ids, "
                "unknown to this lshrs version: open it with the version that built it, or drop() it and build again"
            )

    def to_json(self) -> bytes:
        """The form stored under ``{prefix}:cfg``: plain JSON, never pickle."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> IndexConfig:
        data = json.loads(raw)
        names = {f.name for f in fields(cls)}
        hashing = str(data.get("hashing", "hyperplane"))
        if hashing not in HASHINGS:
            raise ValueError(f"the stored index uses hashing {hashing!r}, unknown to this lshrs version")
        numbers = {k: int(v) for k, v in data.items() if k in names and k != "hashing"}
        return cls(hashing=hashing, **numbers)

    def conflicts(self, stored: IndexConfig, given: set[str]) -> list[str]:
        """Fields the caller set explicitly that differ from the stored index."""
        return [
            f"{name}: given {getattr(self, name)}, stored {getattr(stored, name)}"
            for name in sorted(given | {"dim"})
            if getattr(self, name) != getattr(stored, name)
        ]


def layout_of(id_bytes: int, spill: int = 0) -> int:
    """The layout version of an index with ``id_bytes``-byte ids: a client
    that predates 4-byte ids reads layout 3 as another configuration and
    refuses it, rather than read its buckets as 8-byte ids (and layout 4,
    spilled records, likewise)."""
    if spill:
        return LAYOUT_SPILLED
    return LAYOUT_SHORT_IDS if id_bytes == 4 else LAYOUT_VERSION
