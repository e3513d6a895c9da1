"""Results as JSON, a recall-versus-QPS plot and a markdown table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .datasets import parse_size, size_label

RESULTS = Path(__file__).parent / "results"


def arguments(doc: str | None, *, size: int | None = None, queries: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, ``--name`` for its
    results, and ``--size``/``--queries`` when given their defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if size is not None:
        parser.add_argument("--size", type=parse_size, default=size, help=f"vectors: 100k, 1M (default {size:,})")
    if queries is not None:
        parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--name", default=None, help="the results' file name, without suffix")
    return parser


def stem(args: argparse.Namespace, default: str) -> Path:
    """Where a run's results go: ``--name``, else ``default`` and its size (``memory-1M``)."""
    return RESULTS / (args.name or (f"{default}-{size_label(args.size)}" if "size" in args else default))


def subplots(*args: Any, **options: Any) -> Any:
    """``plt.subplots`` drawn off-screen: a benchmark machine has no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **options)


def finish(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)


def write(result: dict[str, Any], stem: Path) -> None:
    def named(suffix: str) -> Path:  # not with_suffix: "scale-6.4M" would lose its ".4M"
        return stem.parent / f"{stem.name}{suffix}"

    named(".json").write_text(json.dumps(result, indent=2))
    named(".md").write_text(markdown(result))
    plot(result, named(".png"))


def save(
    result: dict[str, Any],
    stem: Path,
    table: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """A run's JSON, its table (``.md``, also printed) and its plot (``.png``) beside ``stem``."""
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    Path(f"{stem}.md").write_text(table(result))
    plot(result, Path(f"{stem}.png"))
    print(table(result))


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; client and servers share the cores.  ",
        f"Data: {result['dataset']}; {result['queries']} real held-out queries; exact brute-force ground truth.",
        "",
        "| system | setting | recall@10 | recall@100 | p50 ms | p95 ms | p99 ms | QPS (64 concurrent) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    served = [p for p in result["points"] if "qps64_processes" in p]
    if served:  # a column only runs that measured it have (benchmarks/processes.py)
        lines[-2] += f" QPS, {served[0]['processes']} client processes |"
        lines[-1] += "---|"
    for p in result["points"]:
        lines.append(
            f"| {p['system']} | {p['setting']} | {p['recall@10']:.3f} | {_at_100(p)} | "
            f"{p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {p['qps64']} |"
            + (f" {p.get('qps64_processes', '-')} |" if served else "")
        )
    lines += ["", "| build | setting | seconds | vectors/s | memory per vector |", "|---|---|---|---|---|"]
    for b in result["builds"]:
        setting = b.get("setting") or _shape(b)
        per_s = b.get("vectors_per_s", round(result["size"] / b["build_s"]) if b["build_s"] else "")
        memory = (
            f"{b['redis_bytes_per_vector']} B in Redis"
            if "redis_bytes_per_vector" in b
            else f"{b['index_bytes_per_vector']} B index"
            if "index_bytes_per_vector" in b
            else ""
        )
        lines.append(f"| {b['system']} | {setting} | {b['build_s']} | {per_s} | {memory} |")
    for b in result["builds"]:
        if b.get("share_curve"):
            lines += [
                "",
                f"lshrs {_shape(b)}: recall@10 of 200 held-out queries against the share of the corpus "
                "read as candidates per query (the curve of `tune(0.98, queries=...)`)",
                "",
                "| probes | recall@10 | candidate share |",
                "|---|---|---|",
            ]
            lines += [f"| {c['probes']} | {c['recall@10']:.3f} | {c['share']:.2%} |" for c in b["share_curve"]]
    if result.get("stores"):
        lines += [
            "",
            "| store | fetch 100 p50/p95 ms | fetch 1,000 p50/p95 ms | fetch 5,000 p50/p95 ms "
            "| query p50/p95 ms | query recall@10 (probes) |",
            "|---|---|---|---|---|---|",
        ]
        for s in result["stores"]:
            cells = [f"{s[f'fetch{n}_p50_ms']} / {s[f'fetch{n}_p95_ms']}" for n in (100, 1000, 5000)]
            query = f"{s['query_p50_ms']} / {s['query_p95_ms']}" if "query_p50_ms" in s else "n/a"
            quality = f"{s['recall@10']} ({s['probes']})" if "recall@10" in s else "n/a"
            lines.append(f"| {s['store']} | {' | '.join(cells)} | {query} | {quality} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [b for b in result["builds"] if b.get("share_curve")]
    figure, panels = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 8, 5), squeeze=False)
    axes = panels[0][0]
    systems: dict[str, list[dict[str, Any]]] = {}
    for p in result["points"]:
        systems.setdefault(_series(p), []).append(p)
        if "qps64_processes" in p:
            served = {**p, "qps64": p["qps64_processes"]}
            systems.setdefault(f"{_series(p)}, {p['processes']} client processes", []).append(served)
    for name, points in systems.items():
        points.sort(key=lambda p: p["recall@10"])
        axes.plot([p["recall@10"] for p in points], [p["qps64"] for p in points], marker="o", label=name)
    axes.set_xlabel("recall@10")
    axes.set_ylabel("queries per second (64 concurrent)")
    axes.set_yscale("log")
    axes.set_title(f"{result['dataset']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    if curves:
        share = panels[0][1]
        for b in curves:
            xs = [100 * c["share"] for c in b["share_curve"]]
            share.plot(xs, [c["recall@10"] for c in b["share_curve"]], marker="o", label=f"lshrs {_shape(b)}")
        share.set_xlabel("candidates read per query, % of the corpus")
        share.set_ylabel("recall@10")
        share.set_title("lshrs: recall against candidate share (probes sweep)")
        share.grid(True, alpha=0.3)
        share.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _shape(build: dict[str, Any]) -> str:
    """A build's index shape: ``kmeans K=6253`` or ``48 bands x 12 rows``."""
    return str(build.get("shape") or f"{build['bands']} bands x {build['rows']} rows")


def _at_100(point: dict[str, Any]) -> str:
    """recall@100 where it was measured (a search capped below 100 results has none)."""
    return f"{point['recall@100']:.3f}" if "recall@100" in point else "-"


def _series(point: dict[str, Any]) -> str:
    """Plot series: lshrs's two hash families are two lines."""
    if point["system"] != "lshrs":
        return str(point["system"])
    return "lshrs kmeans" if "kmeans" in point["setting"] else "lshrs hyperplane"
