"""The ``lshrs`` command: build, query, inspect and drop an index from a shell.

Connection settings come from flags or the environment: ``LSHRS_REDIS_URL``,
``LSHRS_PREFIX``, ``LSHRS_POSTGRES_DSN``, ``LSHRS_TABLE``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

try:
    import click
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit("the lshrs command needs click: pip install 'lshrs[cli]'") from exc

import asyncpg
import numpy as np
from redis.exceptions import RedisError

from ._config import IndexConfig, check_prefix
from ._connect import connect
from ._index import meta_keys
from ._lshrs import LSHRS
from ._progress import counted, row_count
from ._tuning import Tuning
from ._types import Hit, Indexed, Rows, VectorStore

T = TypeVar("T")


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one coroutine; bad input, missing indexes and servers that are down
    become one ``Error:`` line (the traceback with ``--debug``)."""
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().params.get("debug"):
        return asyncio.run(make())
    try:
        return asyncio.run(make())
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc
    except (RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        # A server that is down or refuses us is the user's to fix, not a bug: one line, not a traceback.
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


async def _stored_config(url: str, prefix: str) -> IndexConfig:
    client = await connect(url, 10.0)
    try:
        raw = await client.get(meta_keys(prefix)[0])
    finally:
        await client.aclose()
    if raw is None:
        raise ValueError(f"no index under prefix {prefix!r} at {url}: build one with 'lshrs index'")
    return IndexConfig.from_json(raw)


class NpyStore:
    """A ``.npy`` file read through a memory map, as a read-only store: a
    build streams it batch by batch and a learned index samples all of it."""

    def __init__(self, path: Path, ids: Path | None) -> None:
        self._vectors = np.load(path, mmap_mode="r")
        if self._vectors.ndim != 2:
            raise ValueError(f"{path} holds an array of shape {self._vectors.shape}, not (n, dim)")
        self._ids = np.load(ids).astype(np.int64) if ids else np.arange(len(self._vectors), dtype=np.int64)
        if len(self._ids) != len(self._vectors):
            raise ValueError(f"{ids} has {len(self._ids)} ids for {len(self._vectors)} vectors")

    async def dimension(self) -> int | None:
        return int(self._vectors.shape[1])

    async def count(self) -> int:
        return len(self._vectors)

    async def fetch(self, ids: np.ndarray) -> Rows:
        order = np.argsort(self._ids)
        at = np.searchsorted(self._ids, ids, sorter=order).clip(0, len(order) - 1)
        rows = order[at][self._ids[order[at]] == ids]
        return Rows(self._ids[rows], np.asarray(self._vectors[rows], dtype=np.float32))

    async def sample(self, count: int) -> Rows:
        size = len(self._vectors)
        rows = np.sort(np.random.default_rng(0).choice(size, min(count, size), replace=False))
        return Rows(self._ids[rows], np.asarray(self._vectors[rows], dtype=np.float32))

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        for start in range(0, len(self._vectors), batch_size):
            stop = start + batch_size
            yield Rows(self._ids[start:stop], np.asarray(self._vectors[start:stop], dtype=np.float32))

    async def close(self) -> None:
        """Nothing to release."""


def _never() -> VectorStore:
    raise click.UsageError("give exactly one source: --postgres with --table, or --npy")


def _postgres(dsn: str | None, table: str | None, options: dict[str, Any]) -> VectorStore | None:
    if not dsn:
        return None
    if not table:
        raise click.UsageError("--table (or LSHRS_TABLE) is needed with --postgres")
    from .adapters import PostgresStore

    return PostgresStore(dsn, table=table, **options)


_store_options = [
    click.option(
        "--postgres",
        "dsn",
        envvar="LSHRS_POSTGRES_DSN",
        show_envvar=True,
        help="PostgreSQL DSN of the table with the vectors.",
    ),
    click.option("--table", envvar="LSHRS_TABLE", show_envvar=True, help="Table name, schema-qualified if needed."),
    click.option("--id-column", default="id", show_default=True),
    click.option("--vector-column", envvar="LSHRS_VECTOR_COLUMN", show_envvar=True, default="embedding"),
    click.option(
        "--text-column",
        envvar="LSHRS_TEXT_COLUMN",
        show_envvar=True,
        default=None,
        help="Column returned with each hit.",
    ),
]


def store_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the table options and hands the command one ``store`` (None
    without --postgres) instead of five loose values."""

    @functools.wraps(command)
    def with_store(
        *args: Any,
        dsn: str | None,
        table: str | None,
        id_column: str,
        vector_column: str,
        text_column: str | None,
        **kwargs: Any,
    ) -> Any:
        columns = {"id_column": id_column, "vector_column": vector_column, "text_column": text_column}
        return command(*args, store=_postgres(dsn, table, columns), **kwargs)

    for option in reversed(_store_options):
        with_store = option(with_store)
    return with_store


def _prefix(context: click.Context, parameter: click.Parameter, prefix: str) -> str:
    """Refuse a prefix the library would refuse, as a usage error, before any server is asked."""
    try:
        return check_prefix(prefix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), context, parameter) from exc


@click.group(context_settings={"show_default": True})
@click.option("--redis-url", envvar="LSHRS_REDIS_URL", default="redis://localhost:6379/0", show_envvar=True)
@click.option("--prefix", envvar="LSHRS_PREFIX", default="lshrs", show_envvar=True, callback=_prefix)
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not one line.")
@click.pass_context
def main(context: click.Context, redis_url: str, prefix: str, debug: bool) -> None:
    """Vector similarity search with an LSH index in Redis over your own table.

    \b
    Settings come from flags or the environment:
      LSHRS_REDIS_URL     the Redis (or Redis Cluster node) of the index
      LSHRS_PREFIX        the key prefix of the index
      LSHRS_POSTGRES_DSN  the PostgreSQL DSN of the table (--postgres)
      LSHRS_TABLE         the table with the vectors (--table)
      LSHRS_VECTOR_COLUMN, LSHRS_TEXT_COLUMN  its columns, for every command
    """
    context.obj = {"url": redis_url, "prefix": prefix}  # --debug is read by _run from the root context


@main.command()
@store_options
@click.option("--npy", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A (n, dim) .npy file.")
@click.option("--ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A .npy of ids for --npy.")
@click.option("--shards", type=int, default=None, help="Key groups (Redis Cluster: 4 x masters).")
@click.option(
    "--hashing",
    type=click.Choice(["kmeans", "hyperplane"]),
    default=None,
    help="Hash family of a new index: learned k-means buckets (the default) or random hyperplanes.",
)
@click.option(
    "--id-bytes",
    type=click.Choice(["4", "8"]),
    default=None,
    help="Bytes a new index stores an id in: 4 (the default; ids 0 to 2**32 - 1) or 8 (any 64-bit id).",
)
@click.option(
    "--spill",
    type=click.Choice(["0", "1"]),
    default=None,
    help="Learned index: 1 (the default) files each id in a second bucket too, for a third of the probes; 0 once.",
)
@click.option("--batch-size", type=int, default=10_000, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def index(
    obj: dict[str, str],
    store: VectorStore | None,
    npy: Path | None,
    ids: Path | None,
    shards: int | None,
    hashing: str | None,
    id_bytes: str | None,
    spill: str | None,
    batch_size: int,
    quiet: bool,
) -> None:
    """Build the index from a PostgreSQL table or a .npy file."""
    if (store is None) == (npy is None):
        raise click.UsageError("give exactly one source: --postgres with --table, or --npy")

    async def build() -> Indexed:
        source: VectorStore = store if store is not None else NpyStore(npy, ids) if npy else _never()
        dim = await source.dimension()
        if dim is None:
            raise ValueError("the table has no vectors to index")
        async with LSHRS(
            dim=dim,
            redis_url=obj["url"],
            prefix=obj["prefix"],
            store=source,
            hashing=hashing,
            shards=shards,
            id_bytes=None if id_bytes is None else int(id_bytes),
            spill=None if spill is None else int(spill),
            expected_size=max(await source.count() or 1, 1),
            batch_size=batch_size,
            progress=not quiet,
        ) as lsh:
            return await lsh.index()  # streamed; a new learned index trains on a random sample first

    indexed = _run(build)
    skipped = sum(indexed.skipped.values())
    left_out = f"; skipped {row_count(skipped)} it cannot index ({counted(indexed.skipped)})" if skipped else ""
    click.echo(f"\nindexed {indexed:,} vectors under prefix {obj['prefix']!r}{left_out}", err=True)


@main.command()
@store_options
@click.option("--npy", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A (n, dim) .npy file.")
@click.option("--ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A .npy of ids for --npy.")
@click.option("--batch-size", type=int, default=10_000, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def reconcile(
    obj: dict[str, str], store: VectorStore | None, npy: Path | None, ids: Path | None, batch_size: int, quiet: bool
) -> None:
    """Make the index match its table: add, remove, move and mend what differs.

    Prints what changed as JSON. Run it after a Redis failover or a restore
    from an older snapshot, or after writes made to the table around lshrs.
    """
    if (store is None) == (npy is None):
        raise click.UsageError("give exactly one source: --postgres with --table, or --npy")

    async def run() -> dict[str, int]:
        source: VectorStore = store if store is not None else NpyStore(npy, ids) if npy else _never()
        config = await _stored_config(obj["url"], obj["prefix"])
        async with LSHRS(
            dim=config.dim,
            redis_url=obj["url"],
            prefix=obj["prefix"],
            store=source,
            batch_size=batch_size,
            progress=not quiet,
        ) as lsh:
            return (await lsh.reconcile())._asdict()

    click.echo(json.dumps(_run(run)))


@main.command()
@store_options
@click.option("--id", "by_id", type=int, help="Search with the vector of this row (needs --postgres).")
@click.option("--vector-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help=".npy vector(s).")
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option(
    "--probes", type=int, default=None, help="Buckets to read (default: the saved tuning, else the family's)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit.")
@click.pass_obj
def query(
    obj: dict[str, str],
    store: VectorStore | None,
    by_id: int | None,
    vector_file: Path | None,
    top_k: int,
    probes: int | None,
    as_json: bool,
) -> None:
    """Print the nearest rows to a stored row or to a vector file."""
    if (by_id is None) == (vector_file is None):
        raise click.UsageError("give exactly one of --id or --vector-file")
    if by_id is not None and store is None:
        raise click.UsageError("--id needs --postgres and --table, to read the row's vector")

    async def search() -> list[list[Hit]]:
        config = await _stored_config(obj["url"], obj["prefix"])
        async with LSHRS(dim=config.dim, redis_url=obj["url"], prefix=obj["prefix"], store=store, probes=probes) as lsh:
            if by_id is not None:
                assert store is not None
                rows = await store.fetch(np.array([by_id], dtype=np.int64))
                if not len(rows):
                    raise ValueError(f"row {by_id} is not in the table (or its vector is NULL)")
                vectors = rows.vectors
            else:
                assert vector_file is not None
                vectors = np.atleast_2d(np.load(vector_file))
            return await lsh.query_many(vectors, top_k=top_k)

    results = _run(search)
    for number, hits in enumerate(results):
        if not as_json and len(results) > 1:
            click.echo(f"{'' if number == 0 else chr(10)}query {number}:")  # a blank line between queries
        for rank, hit in enumerate(hits, 1):
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "query": number,
                            "rank": rank,
                            "id": hit.id,
                            "score": hit.score,
                            "exact": hit.exact,
                            "text": hit.text,
                        }
                    )
                )
            else:
                text = f"  {hit.text}" if hit.text else ""
                click.echo(f"{rank:>3}  {hit.id:>12}  {hit.score:.4f}{'' if hit.exact else '~'}{text}")


@main.command()
@store_options
@click.option("--target", type=float, default=0.95, show_default=True, help="Recall@10 to reach.")
@click.option("--sample", type=int, default=200, show_default=True, help="Stored rows used as queries.")
@click.option("--dry-run", is_flag=True, help="Measure and print the curve; save nothing.")
@click.pass_obj
def tune(obj: dict[str, str], store: VectorStore | None, target: float, sample: int, dry_run: bool) -> None:
    """Measure recall against exact search and save the fewest probes that reach --target."""
    if store is None:
        raise click.UsageError("tune reads the vectors: give --postgres and --table")

    async def measure() -> Tuning:
        config = await _stored_config(obj["url"], obj["prefix"])
        async with LSHRS(dim=config.dim, redis_url=obj["url"], prefix=obj["prefix"], store=store) as lsh:
            return await lsh.tune(target, sample=sample, progress=True, save=not dry_run)

    tuning = _run(measure)
    for point in tuning.curve:
        click.echo(f"probes {point.probes:>6}: recall@10 {point.recall:.3f}, {point.candidates:,.0f} candidates")
    verb = "would save" if dry_run else "saved"
    read = f"{tuning.candidate_share:.1%} of the index read"
    saved = f"{verb} probes={tuning.probes} (recall {tuning.recall:.3f}, {read})"
    if tuning.rebuild_bands:  # hyperplanes: what a rebuild at this size would choose
        saved += f"; a rebuild at this size would use {tuning.rebuild_bands} bands x {tuning.rebuild_rows} rows"
    click.echo(saved)


@main.command()
@click.pass_obj
@click.option("--exact", is_flag=True, help="Read every bucket key instead of a sample of 5,000 (with a progress bar).")
def stats(obj: dict[str, str], exact: bool) -> None:
    """Configuration, vector count, buckets, the index's Redis memory, bucket size histogram."""

    async def gather() -> dict[str, Any]:
        config = await _stored_config(obj["url"], obj["prefix"])
        async with LSHRS(dim=config.dim, redis_url=obj["url"], prefix=obj["prefix"]) as lsh:
            return await lsh.stats(exact=exact, progress=exact)  # a sample takes well under a second

    click.echo(json.dumps(_run(gather), indent=2))


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def drop(obj: dict[str, str], yes: bool) -> None:
    """Delete every key of the index under the prefix."""
    if not yes:
        click.confirm(f"delete the index under prefix {obj['prefix']!r} at {obj['url']}?", abort=True)

    async def remove() -> int:
        config = await _stored_config(obj["url"], obj["prefix"])
        async with LSHRS(dim=config.dim, redis_url=obj["url"], prefix=obj["prefix"]) as lsh:
            return await lsh.drop()

    click.echo(f"deleted {_run(remove):,} keys")
