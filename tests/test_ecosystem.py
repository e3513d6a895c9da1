"""The FastAPI and aiohttp examples and the ``lshrs`` command, on real Redis and PostgreSQL."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from conftest import clustered
from lshrs.cli import main as cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import aiohttp_app
import fastapi_app
import settings

pytestmark = pytest.mark.anyio

N, DIM = 600, 24
BASE = clustered(N, DIM, seed=33)


@pytest.fixture
async def table(postgres_dsn: str, redis_proc: Any) -> AsyncIterator[tuple[str, str]]:
    """A fresh ``docs`` table (bytea vectors, texts) and an empty Redis."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("DROP TABLE IF EXISTS docs")
    await conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, embedding bytea, body text)")
    await conn.executemany(
        "INSERT INTO docs VALUES ($1, $2, $3)", [(i, BASE[i].astype("<f4").tobytes(), f"doc {i}") for i in range(N)]
    )
    await conn.close()
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    client = Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    yield postgres_dsn, url


async def test_fastapi_service(table: tuple[str, str]) -> None:
    dsn, url = table
    app = fastapi_app.create_app(settings.Settings(redis_url=url, prefix="lshrs", dsn=dsn, table="docs"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/index")).json() == {"indexed": N}
            hits = (await client.get("/search", params={"id": 7, "top_k": 3})).json()
            assert hits[0]["id"] == 7 and hits[0]["text"] == "doc 7"
            hits = (await client.post("/search", json={"vector": BASE[9].tolist(), "top_k": 2})).json()
            assert hits[0]["id"] == 9
            assert (await client.delete("/documents/9")).json() == {"deleted": 1}
            hits = (await client.post("/search", json={"vector": BASE[9].tolist(), "top_k": 2})).json()
            assert hits[0]["id"] != 9
            assert (await client.post("/documents", json={"id": 9})).status_code == 201
            assert (await client.get("/search", params={"id": 9})).json()[0]["id"] == 9
            bad = await client.post("/search", json={"vector": [1.0, 2.0]})
            assert bad.status_code == 400 and "shape" in bad.json()["detail"]
            for params, reason in [({"id": "abc"}, "integer"), ({}, "required"), ({"id": 3, "top_k": 0}, "top_k")]:
                refused = await client.get("/search", params=params)
                assert refused.status_code == 400 and reason in refused.text, (params, refused.text)
            missing = await client.get("/search", params={"id": 123456})
            assert missing.status_code == 404, missing.text


async def test_aiohttp_service(table: tuple[str, str]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    dsn, url = table
    app = aiohttp_app.create_app(settings.Settings(redis_url=url, prefix="lshrs", dsn=dsn, table="docs"))
    async with TestClient(TestServer(app)) as client:
        await app[aiohttp_app.LSH].index()
        response = await client.get("/search", params={"id": "11", "top_k": "2"})
        assert response.status == 200
        assert (await response.json())[0] == {"id": 11, "score": pytest.approx(1.0, abs=1e-5), "text": "doc 11"}
        for params, reason in (
            ({"id": "abc"}, "id must be an integer"),
            ({}, "'id' is required"),
            ({"id": "11", "top_k": "0"}, "top_k must be at least 1"),
        ):
            bad = await client.get("/search", params=params)
            assert bad.status == 400 and reason in await bad.text(), (params, await bad.text())
        assert (await client.get("/search", params={"id": "123456"})).status == 404


def test_the_examples_name_missing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started with no environment, both examples stop at start-up naming what is missing."""
    import asyncio

    for name in ("LSHRS_POSTGRES_DSN", "LSHRS_TABLE"):
        monkeypatch.delenv(name, raising=False)
    both = r"set LSHRS_POSTGRES_DSN \(the PostgreSQL DSN\) and LSHRS_TABLE \(the table with the vectors\);"
    with pytest.raises(RuntimeError, match=both):
        aiohttp_app.create_app()
    monkeypatch.setenv("LSHRS_POSTGRES_DSN", "postgresql://localhost/wiki")
    with pytest.raises(RuntimeError, match=r"^set LSHRS_TABLE \(the table with the vectors\);"):
        aiohttp_app.create_app()
    monkeypatch.delenv("LSHRS_POSTGRES_DSN")

    async def start_fastapi() -> None:
        app = fastapi_app.create_app()
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match=both):
        asyncio.run(start_fastapi())


async def test_the_fastapi_example_reads_the_prefix(table: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """LSHRS_PREFIX, as the CLI honours it: the service opens that index."""
    dsn, url = table
    for name, value in {
        "LSHRS_POSTGRES_DSN": dsn,
        "LSHRS_TABLE": "docs",
        "LSHRS_REDIS_URL": url,
        "LSHRS_PREFIX": "svc",
    }.items():
        monkeypatch.setenv(name, value)
    app = fastapi_app.create_app()
    async with app.router.lifespan_context(app):
        assert app.state.lsh.prefix == "svc"


def test_cli_index_query_stats_drop(postgres_dsn: str, redis_proc: Any, tmp_path: Path) -> None:
    import asyncio

    async def prepare() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute("DROP TABLE IF EXISTS cli_docs")
        await conn.execute("CREATE TABLE cli_docs (id bigint PRIMARY KEY, embedding real[], body text)")
        await conn.executemany(
            "INSERT INTO cli_docs VALUES ($1, $2, $3)", [(i, BASE[i].tolist(), f"text {i}") for i in range(N)]
        )
        await conn.close()

    asyncio.run(prepare())
    env = {"LSHRS_REDIS_URL": f"redis://{redis_proc.host}:{redis_proc.port}/2", "LSHRS_POSTGRES_DSN": postgres_dsn,
           "LSHRS_TABLE": "cli_docs", "LSHRS_PREFIX": "cli"}  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(cli, ["drop", "--yes"], env=env)  # nothing there yet: a clean error
    assert result.exit_code == 1 and "no index under prefix 'cli'" in result.output
    result = runner.invoke(cli, ["index", "--text-column", "body", "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    assert f"indexed {N} vectors" in result.output
    result = runner.invoke(cli, ["query", "--id", "5", "--top-k", "3", "--text-column", "body", "--json"], env=env)
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.splitlines()[0])
    assert first["id"] == 5 and first["text"] == "text 5" and first["exact"]
    result = runner.invoke(cli, ["query", "--id", "987654", "--top-k", "3"], env=env)
    assert result.exit_code == 1 and "row 987654 is not in the table" in result.output
    np.save(tmp_path / "q.npy", BASE[8])
    result = runner.invoke(cli, ["query", "--vector-file", str(tmp_path / "q.npy"), "--top-k", "1"], env=env)
    assert result.exit_code == 0 and result.output.split()[1] == "8"
    np.save(tmp_path / "two.npy", BASE[[8, 9]])
    two = ["query", "--vector-file", str(tmp_path / "two.npy"), "--top-k", "1", "--probes", "4"]
    result = runner.invoke(cli, two, env={**env, "LSHRS_TEXT_COLUMN": "body"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "query 0:" and "\nquery 1:" in result.output  # each query labelled
    assert "text 8" in result.output and "text 9" in result.output  # the text column from the environment
    assert "LSHRS_POSTGRES_DSN" in runner.invoke(cli, ["--help"]).output
    result = runner.invoke(cli, ["tune", "--target", "0.9", "--sample", "20"], env=env)
    assert result.exit_code == 0, result.output
    assert "saved probes=" in result.output and "recall@10" in result.output
    assert "bands" not in result.output  # a learned index has none to suggest for a rebuild
    saved = int(result.output.split("saved probes=")[1].split()[0])
    stats = json.loads(runner.invoke(cli, ["stats"], env=env).output)
    assert stats["probes"] == saved  # every later client uses what tune saved
    assert stats["vectors"] == N and stats["config"]["dim"] == DIM and stats["buckets"] > 0
    assert sum(stats["bucket_size_histogram"].values()) == stats["buckets"]
    result = runner.invoke(cli, ["tune", "--target", "1.0", "--sample", "20", "--dry-run"], env=env)
    assert result.exit_code == 0 and "would save probes=" in result.output, result.output
    assert json.loads(runner.invoke(cli, ["stats"], env=env).output)["probes"] == saved  # nothing saved

    async def remove_row() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute("DELETE FROM cli_docs WHERE id = 3")
        await conn.close()

    asyncio.run(remove_row())  # behind lshrs's back: reconcile finds it
    result = runner.invoke(cli, ["reconcile", "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["removed"] == 1 and report["unchanged"] == N - 1 and report["added"] == 0
    np.save(tmp_path / "more.npy", BASE[:300])  # a learned index trains on a first write of 256 or more
    both = runner.invoke(cli, ["--prefix", "npy", "index", "--npy", str(tmp_path / "more.npy")], env=env)
    assert both.exit_code == 2 and "exactly one source" in both.output
    no_table = {**env, "LSHRS_POSTGRES_DSN": ""}
    result = runner.invoke(
        cli, ["--prefix", "npy", "index", "--npy", str(tmp_path / "more.npy"), "--quiet"], env=no_table
    )
    assert result.exit_code == 0 and "indexed 300 vectors" in result.output
    result = runner.invoke(cli, ["drop", "--yes"], env=env)
    assert result.exit_code == 0 and "deleted" in result.output
    result = runner.invoke(cli, ["index"], env={**env, "LSHRS_POSTGRES_DSN": ""})
    assert result.exit_code == 2 and "exactly one source" in result.output


def test_cli_index_npy_takes_the_hash_family(redis_proc: Any, tmp_path: Path) -> None:
    """``--hashing`` picks the family of a new index built from a .npy file,
    ``--id-bytes`` its id width, ``--spill`` whether a learned id takes a
    second bucket; the learned build says on stderr what it fits."""
    np.save(tmp_path / "vectors.npy", BASE[:300])
    env = {"LSHRS_REDIS_URL": f"redis://{redis_proc.host}:{redis_proc.port}/2"}
    runner = CliRunner()
    cases = (
        ("npy-banded", "hyperplane", [], 4, 0),
        ("npy-learned", "kmeans", [], 4, 1),
        ("npy-long", "kmeans", ["--id-bytes", "8"], 8, 1),
        ("npy-once", "kmeans", ["--spill", "0"], 4, 0),
    )
    for prefix, hashing, options, width, spill in cases:
        runner.invoke(cli, ["--prefix", prefix, "drop", "--yes"], env=env)
        source = ["--npy", str(tmp_path / "vectors.npy"), "--hashing", hashing, *options]
        built = runner.invoke(cli, ["--prefix", prefix, "index", *source], env=env)
        assert built.exit_code == 0, built.output
        assert ("fitting" in built.output) == (hashing == "kmeans"), built.output
        stats = json.loads(runner.invoke(cli, ["--prefix", prefix, "stats"], env=env).output)
        assert stats["config"]["hashing"] == hashing and stats["vectors"] == 300
        assert (stats["config"]["id_bytes"], stats["config"]["spill"]) == (width, spill)
        runner.invoke(cli, ["--prefix", prefix, "drop", "--yes"], env=env)
    bad = runner.invoke(cli, ["index", "--npy", str(tmp_path / "vectors.npy"), "--id-bytes", "5"], env=env)
    assert bad.exit_code == 2 and "'5' is not one of '4', '8'" in bad.output
    bad = runner.invoke(cli, ["index", "--npy", str(tmp_path / "vectors.npy"), "--spill", "2"], env=env)
    assert bad.exit_code == 2 and "'2' is not one of '0', '1'" in bad.output
