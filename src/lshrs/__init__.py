"""lshrs: vector similarity search over the database you already have.

A locality-sensitive-hash index lives in Redis; vectors stay in your store
(Postgres, any SQLAlchemy database, Redis, or memory) and are fetched only to
rerank a query's few best candidates by exact cosine.
"""

from ._config import IndexConfig, collision_probability
from ._errors import IndexMissing, Overloaded
from ._lshrs import LSHRS
from ._tuning import Tuning, TuningPoint
from ._types import Hit, Indexed, ProgressCallback, Reconciled, Rows, VectorStore, WritableStore

__all__ = [
    "LSHRS",
    "Hit",
    "IndexConfig",
    "IndexMissing",
    "Indexed",
    "Overloaded",
    "ProgressCallback",
    "Reconciled",
    "Rows",
    "Tuning",
    "TuningPoint",
    "VectorStore",
    "WritableStore",
    "collision_probability",
]
__version__ = "0.1.0"
