"""Real servers on loopback for the tests: a 3-master Redis Cluster and PostgreSQL.

The single Redis comes from pytest-redis; these two have no such fixture that
fits (cluster creation; PostgreSQL refusing to run as root), so they are run
with mirakuru, the process executor pytest-redis and pytest-postgresql use.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import port_for
from mirakuru import TCPExecutor


@dataclass
class Server:
    """A running server: where to reach it, and its executor to stop and restart it."""

    url: str
    executor: TCPExecutor


def _free_port() -> int:
    return int(port_for.select_random())


def _cluster_port(taken: list[int]) -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    while True:
        port = int(port_for.select_random(ports=set(range(20000, 45000))))
        if port not in taken and port + 10000 not in taken and port_for.is_available(port + 10000):
            return port


@contextmanager
def redis_server(*extra: str, port: int | None = None, binary: str | None = None) -> Iterator[Server]:
    """One throwaway redis-server on loopback, for benchmarks and for tests that
    configure or restart it (the plain suite uses pytest-redis). ``--port 0``
    in ``extra`` with ``--tls-port`` makes it TLS-only on ``port``; ``binary``
    runs another server that takes redis-server's options (Valkey)."""
    redis_server = binary or shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is not installed: run scripts/install-servers.sh")
    port = port or _free_port()
    with tempfile.TemporaryDirectory(prefix="lshrs-redis-") as root:
        command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", root, *extra]
        # A TLS-only server (--port 0) still answers on ``port``, its TLS port.
        executor = TCPExecutor(command, host="127.0.0.1", port=port, timeout=30)
        executor.start()
        try:
            yield Server(f"redis://127.0.0.1:{port}/0", executor)
        finally:
            executor.stop()


@contextmanager
def redis_cluster(masters: int = 3) -> Iterator[list[int]]:
    """``masters`` redis-server nodes joined into one cluster; yields their ports.

    Its node timeout is Redis's default, 15 s: with no replicas to promote, a
    node the others think failed only takes the cluster down, and at 2 s a
    loaded CI machine made the cluster answer "The cluster is down" mid-test."""
    with redis_cluster_nodes(masters, node_timeout_ms=15000) as nodes:
        yield [node.port for node in nodes]


@dataclass
class ClusterNode:
    port: int
    executor: TCPExecutor

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextmanager
def redis_cluster_nodes(
    masters: int = 3, replicas: int = 0, *, node_timeout_ms: int = 2000
) -> Iterator[list[ClusterNode]]:
    """A cluster of ``masters`` masters with ``replicas`` replicas each; yields
    every node (masters first, as ``redis-cli --cluster create`` assigns them),
    with the executor that a failover test kills. ``node_timeout_ms`` is how
    long a silent master has before its replica takes over: short, so a
    failover test waits seconds, not the default 15."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is not installed: run scripts/install-servers.sh")
    ports: list[int] = []
    for _ in range(masters * (1 + replicas)):
        ports.append(_cluster_port(ports))
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lshrs-cluster-")))
        nodes = []
        for port in ports:
            node = root / str(port)
            node.mkdir()
            command = [
                redis_server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
            ]
            executor = TCPExecutor(command, host="127.0.0.1", port=port, timeout=30)
            executor.start()
            stack.callback(_stop, executor)
            nodes.append(ClusterNode(port, executor))
        addresses = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)
        yield nodes


def _stop(executor: TCPExecutor) -> None:
    """Stop a node unless a test already killed it."""
    if executor.process is not None and executor.process.poll() is None:
        executor.stop()


def _cluster_ok(port: int) -> bool:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
    ).stdout
    return "cluster_state:ok" in out


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    explicit = os.environ.get("LSHRS_PG_BIN")
    if explicit:
        return Path(explicit) / "postgres"
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: run scripts/install-servers.sh")
    return Path(found[-1])


@contextmanager
def postgres() -> Iterator[Server]:
    """A throwaway PostgreSQL on a loopback port; yields its superuser's DSN.
    As root, the server runs as the ``postgres`` user (initdb refuses root)."""
    bindir = _postgres_bin().parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    port = _free_port()
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lshrs-pg-")))
        if as_postgres:
            shutil.chown(root, "postgres")
        data = root / "data"
        subprocess.run(
            [
                *as_postgres,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        command = [
            *as_postgres,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients.
        executor = TCPExecutor(command, host="127.0.0.1", port=port, timeout=60, stop_signal=signal.SIGINT)
        executor.start()
        stack.callback(executor.stop)
        yield Server(f"postgresql://postgres@127.0.0.1:{port}/postgres", executor)
