"""Load: many concurrent queries plus a stream of inserts and deletes on one event
loop against a 100k index, for a fixed time. Reports served, refused and
timed-out calls, latency of served queries against one-at-a-time queries,
the longest call against its deadline (and the longest stall of the event
loop and of the garbage collector, which a deadline cannot cut short),
acknowledged writes missing at the end, and memory.

    nox -s load                       # 10,000 queries in flight for 60 s, 1 s deadlines
    python -m benchmarks.load --seconds 10 --concurrency 1000 --timeout 0.5
    python -m benchmarks.load --gc-freeze   # as a service that freezes its start-up objects
    python -m benchmarks.load --gc-off      # ... and then turns the cycle collector off
"""

from __future__ import annotations

import asyncio
import gc
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis.asyncio import Redis

from conftest import index_state
from lshrs import LSHRS, Overloaded
from lshrs.adapters import InMemoryStore
from servers import redis_server

from .datasets import load
from .measure import percentiles
from .report import arguments, finish, save, stem, subplots


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stalls:
    """The longest the event loop stood still, and the longest pause of the
    garbage collector: a call whose deadline passes during either ends late
    by as much, whatever lshrs does."""

    def __init__(self) -> None:
        self.loop_s = 0.0
        self.gc_s = 0.0
        self._gc_started = 0.0

    async def watch(self, until: float) -> None:
        tick = 0.01
        while time.monotonic() < until:
            started = time.perf_counter()
            await asyncio.sleep(tick)
            self.loop_s = max(self.loop_s, time.perf_counter() - started - tick)

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_s = max(self.gc_s, time.perf_counter() - self._gc_started)


async def unloaded(lsh: LSHRS, queries: np.ndarray, count: int = 300) -> dict[str, float]:
    """Latency of one query at a time: the baseline served queries are held to."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await lsh.query(queries[i % len(queries)], top_k=10)
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


async def run(
    url: str,
    seconds: float,
    concurrency: int,
    timeout: float,
    max_inflight: int,
    max_waiting: int | None = None,
    collector: str = "on",
) -> dict[str, Any]:
    """``collector``: "on", "freeze" (``gc.freeze()`` after start-up) or
    "off" (frozen, then ``gc.disable()``)."""
    data = load("minilm", 100_000, 1000)
    # The deadline goes on each call (timeout=): the client's own timeout stays
    # the default, which also bounds every Redis command of the build.
    async with LSHRS(
        dim=384, redis_url=url, prefix="load", store=InMemoryStore(), max_inflight=max_inflight, max_waiting=max_waiting
    ) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(100_000), data.base)
        await lsh.warm()  # as a service does at start-up
        alone = await unloaded(lsh, data.queries)
        if collector != "on":
            # What start-up made (modules, the client, the data) lives as long
            # as the process: frozen, a full collection no longer walks it.
            gc.collect()
            gc.freeze()
        if collector == "off":
            # No collection pauses at all, safe only if the calls leave no
            # cyclic garbage: what one collection finds at the end is reported.
            gc.disable()
        deadline = time.monotonic() + seconds
        served: list[float] = []
        refused: list[float] = []
        late: list[float] = []
        errors: list[str] = []
        ingested: set[int] = set()
        deleted: set[int] = set()
        rss_after_build = rss_mb()

        # Calls begun in the first second share the loop with the 10,000
        # callers' first calls, all made in one pass of the loop: reported
        # apart, as the start-up burst.
        after_burst: list[float] = []
        burst_ends = time.perf_counter() + 1.0

        async def reader(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                started = time.perf_counter()
                outcome: list[float] | None
                try:
                    await lsh.query(data.queries[i % len(data.queries)], top_k=10, timeout=timeout)
                    outcome = served
                except Overloaded:
                    outcome = refused
                except TimeoutError:
                    outcome = late
                except Exception as exc:  # counted, not hidden: the report shows them
                    errors.append(repr(exc))
                    outcome = None
                took = time.perf_counter() - started
                if outcome is not None:
                    outcome.append(took)
                if started > burst_ends and (outcome is served or outcome is late):
                    after_burst.append(took)
                if outcome is refused or outcome is late:
                    # A client told 503 backs off. Outside the except block: a
                    # sleep inside it keeps the exception, its traceback and
                    # every frame of the call alive, 200,000 objects for the GC.
                    await asyncio.sleep(random.uniform(0.5, 1.5))
                i += concurrency

        async def writer() -> None:
            rng = np.random.default_rng(1)
            next_id = 100_000
            while time.monotonic() < deadline:
                try:
                    await lsh.ingest(next_id, data.base[rng.integers(100_000)], timeout=timeout)
                    ingested.add(next_id)
                    gone = int(rng.integers(next_id))
                    await lsh.delete([gone], timeout=timeout)
                    deleted.add(gone)
                    pause = 0.0
                except (Overloaded, TimeoutError):
                    pause = 0.05
                except Exception as exc:
                    errors.append(repr(exc))
                    pause = 0.0
                await asyncio.sleep(pause)
                next_id += 1

        started = time.monotonic()
        stalls = Stalls()
        gc.callbacks.append(stalls.on_gc)
        tasks = [asyncio.create_task(reader(k)) for k in range(concurrency)] + [asyncio.create_task(writer())]
        tasks.append(asyncio.create_task(stalls.watch(deadline)))
        await asyncio.gather(*tasks)  # every call keeps its deadline, so this ends by seconds + timeout
        elapsed = time.monotonic() - started
        gc.callbacks.remove(stalls.on_gc)
        frozen = gc.get_freeze_count()
        cyclic = gc.collect() if collector == "off" else None
        gc.enable()
        gc.unfreeze()
        client = Redis.from_url(url)
        present = set(await index_state(client, lsh))
        await client.aclose()
        calls = served + late
        return {
            "concurrency": concurrency,
            "seconds": seconds,
            "timeout_s": timeout,
            "max_inflight": max_inflight,
            "max_waiting": lsh._admission.most_waiting,
            "gc_frozen_objects": frozen,
            "gc": collector,
            "cyclic_garbage_after_run": cyclic,
            "elapsed_s": round(elapsed, 1),
            "served": len(served),
            "served_qps": round(len(served) / elapsed, 1),
            "refused": len(refused),
            "timed_out": len(late),
            "unloaded_ms": alone,
            "served_ms": percentiles(served or [0.0]),
            "p99_vs_unloaded": round(percentiles(served or [0.0])["p99_ms"] / alone["p99_ms"], 2),
            "refused_ms": percentiles(refused or [0.0]),
            "refused_max_ms": round(1000 * max(refused, default=0.0), 2),
            "refused_over_5ms": sum(took > 0.005 for took in refused),
            "longest_call_s": round(max(calls, default=0.0), 3),
            "worst_overrun_ms": round(1000 * max(0.0, max(calls, default=0.0) - timeout), 1),
            "overruns_over_allowed": sum(took > timeout + max(0.1 * timeout, 0.05) for took in calls),
            "worst_overrun_after_burst_ms": round(1000 * max(0.0, max(after_burst, default=0.0) - timeout), 1),
            "writes_acknowledged": len(ingested) + len(deleted),
            "acknowledged_ingests_missing": len((ingested - deleted) - present),
            "acknowledged_deletes_present": len(deleted & present),
            "errors": len(errors),
            "first_errors": errors[:5],
            "longest_loop_stall_ms": round(1000 * stalls.loop_s, 1),
            "longest_gc_pause_ms": round(1000 * stalls.gc_s, 1),
            "rss_mb_after_build": round(rss_after_build),
            "rss_mb_peak": round(rss_mb()),
        }


def waiting(result: dict[str, Any]) -> int:
    """Calls that could queue (results from before ``max_waiting`` existed had 64 a slot)."""
    return int(result.get("max_waiting", 64 * result["max_inflight"]))


def table(result: dict[str, Any]) -> str:
    served, alone = result["served_ms"], result["unloaded_ms"]
    deadline = f"{result['timeout_s']} s"
    cyclic = result.get("cyclic_garbage_after_run")
    rows = [
        ("calls in flight", result["concurrency"]),
        ("max_inflight, max_waiting, deadline", f"{result['max_inflight']}, {waiting(result)}, {deadline}"),
        ("objects frozen at start-up (gc.freeze)", result.get("gc_frozen_objects", 0)),
        ("cycle collector during the run", result.get("gc", "-")),
        ("cyclic garbage left by the run (gc off: objects)", "-" if cyclic is None else cyclic),
        ("served / refused / timed out", f"{result['served']} / {result['refused']} / {result['timed_out']}"),
        ("served QPS", result["served_qps"]),
        ("served p50 / p95 / p99 ms", f"{served['p50_ms']} / {served['p95_ms']} / {served['p99_ms']}"),
        ("one at a time p50 / p95 / p99 ms", f"{alone['p50_ms']} / {alone['p95_ms']} / {alone['p99_ms']}"),
        ("refusal p99 / slowest ms", f"{result['refused_ms']['p99_ms']} / {result['refused_max_ms']}"),
        ("refusals slower than 5 ms", result.get("refused_over_5ms", "-")),
        ("longest call s (worst overrun ms)", f"{result['longest_call_s']} ({result['worst_overrun_ms']})"),
        ("calls past their deadline by more than max(10%, 50 ms)", result.get("overruns_over_allowed", "-")),
        ("worst overrun after the first second ms", result["worst_overrun_after_burst_ms"]),
        ("writes acknowledged / lost", f"{result['writes_acknowledged']} / "
         f"{result['acknowledged_ingests_missing'] + result['acknowledged_deletes_present']}"),
        ("longest loop stall ms (GC pause ms)", f"{result['longest_loop_stall_ms']} ({result['longest_gc_pause_ms']})"),
        ("peak RSS MB", result["rss_mb_peak"]),
    ]  # fmt: skip
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (left, right) = subplots(1, 2, figsize=(10, 4))
    labels = ["p50", "p95", "p99"]
    for offset, (name, values) in enumerate(
        (("one at a time", result["unloaded_ms"]), ("served", result["served_ms"]))
    ):
        left.bar([i + 0.4 * offset for i in range(3)], [values[f"{p}_ms"] for p in labels], 0.4, label=name)
    left.set_xticks([i + 0.2 for i in range(3)], labels)
    left.set_ylabel("ms")
    left.axhline(1000 * result["timeout_s"], color="grey", linestyle="--", label="deadline")
    left.legend()
    outcomes = ["served", "refused", "timed_out"]
    right.bar(outcomes, [result[o] for o in outcomes])
    right.set_yscale("log")
    setting = f"max_inflight {result['max_inflight']}, max_waiting {waiting(result)}, deadline {result['timeout_s']} s"
    collector = {"on": "", "freeze": ", collector frozen", "off": ", collector off"}[result.get("gc", "on")]
    figure.suptitle(f"{result['concurrency']} calls in flight, {setting}{collector}")
    finish(figure, path)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=1.0, help="each call's deadline, seconds")
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=None, help="calls that may queue (default 64 a slot)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start-up, as a service may")
    modes.add_argument("--gc-off", action="store_true", help="gc.freeze(), then gc.disable(), after start-up")
    args = parser.parse_args()
    collector = "off" if args.gc_off else "freeze" if args.gc_freeze else "on"
    with redis_server("--appendonly", "no") as server:
        result = asyncio.run(
            run(
                server.url,
                args.seconds,
                args.concurrency,
                args.timeout,
                args.max_inflight,
                args.max_waiting,
                collector,
            )
        )
    queue = "" if args.max_waiting is None else f"-queue{args.max_waiting}"
    suffix = {"on": "", "freeze": "-frozen", "off": "-gcoff"}[collector]
    name = f"load-{args.concurrency}-{args.max_inflight}x{args.timeout:g}s{queue}{suffix}"
    save(result, stem(args, name), table, plot)


if __name__ == "__main__":
    main()
