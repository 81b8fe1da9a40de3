"""corral's performance contract: every benchmark, one table of ratios measured in one run.

    python bench/run.py [--quick] [--rounds N] [--json]

Each round runs every method one after the other (so that every method sees
the same machine, load from elsewhere included): the latency of one trivial
execution by a raw fork, a fresh interpreter, bubblewrap (where installed)
and both backends, back to back and each after an idle spell
(`latency.Latency`; the targets are against the fork floor timed in a bare
interpreter, and the host's own fork floor informs); the throughput of both backends at 1,
2 and the worker pool's size in flight (`latency.Throughput`); a one-node
workflow through WorkflowRuntime against a bare execution
(`runtime.RuntimeBench`); the start-up of whole commands, `import corral` and
`corral run`, against a bare `python3 -I -c pass` (`startup.StartupBench`). Then, with
everything idle, the memory of the zygote and of a worker (`memory.sandbox_memory`).

Each row: the measured value, its baseline, their ratio, the target and
PASS/FAIL (`info` where there is no target). Progress goes to stderr. Exit
status 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import latency
import memory
import runtime
import startup
from latency import Latency, Throughput, progress, warm_sandboxes
from runtime import RuntimeBench
from startup import StartupBench

from corral.config import get_settings


@dataclass(frozen=True)
class Sizes:
    """How much each round measures."""

    rounds: int
    latency: int  # fork and corral samples a round
    slow: int  # fresh interpreter, bubblewrap and idle-first samples a round (~20-60 ms each)
    throughput: int  # executions of each backend at each concurrency a round
    runtime: int  # bare executions and workflows a round
    startup: int  # runs of each whole command a round (~20-300 ms each)


FULL = Sizes(rounds=10, latency=40, slow=8, throughput=40, runtime=20, startup=2)
QUICK = Sizes(rounds=3, latency=20, slow=4, throughput=20, runtime=10, startup=2)
BARE_FLOOR_NOTE = (
    "fork floor timed inside a bare python -I -S, not this host: what a fork costs "
    "whatever the caller's size"
)
GAP_MS = round(latency.GAP_S * 1000)
SETTLE_S = 0.3  # after the last execution: the spares it asked for are forked and waiting


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    check: str
    value: float | None
    baseline: float | None
    unit: str
    ratio: float | None
    target: str  # e.g. "<= 2.00x"; "" when the row only informs
    passed: bool | None  # None: no target
    note: str = ""

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else "PASS" if self.passed else "FAIL"


def ratio_row(
    check: str, value: float, baseline: float, unit: str, *, at_most: float | None = None,
    at_least: float | None = None, note: str = "",
) -> Row:  # fmt: skip
    """A row whose target bounds value / baseline (or that only informs)."""
    ratio = value / baseline
    if at_most is not None:
        return Row(check, value, baseline, unit, ratio, f"<= {at_most:.2f}x", ratio <= at_most,
                   note)  # fmt: skip
    if at_least is not None:
        return Row(check, value, baseline, unit, ratio, f">= {at_least:.2f}x",
                   ratio >= at_least, note)  # fmt: skip
    return Row(check, value, baseline, unit, ratio, "", None, note)


def memory_row(name: str, figures: list[memory.Footprint], bare: memory.Footprint) -> Row:
    """The largest RSS among `figures` against the target, PSS and USS beside it."""
    if not figures:
        return Row(f"{name} RSS", None, bare.rss_mb, "MB", None,
                   f"<= {memory.TARGET_RSS_MB:.0f} MB", False, "none found")  # fmt: skip
    worst = max(figures, key=lambda f: f.rss_mb)
    return Row(
        f"{name} RSS", worst.rss_mb, bare.rss_mb, "MB", worst.rss_mb / bare.rss_mb,
        f"<= {memory.TARGET_RSS_MB:.0f} MB", worst.rss_mb <= memory.TARGET_RSS_MB,
        f"PSS {worst.pss_mb:.1f} MB, USS {worst.uss_mb:.1f} MB; baseline: idle python -I -S",
    )  # fmt: skip


async def measure(sizes: Sizes) -> tuple[list[Row], dict[str, object]]:
    """Every benchmark, round by round; the rows and the details behind them."""
    progress("starting the sandboxes")
    async with warm_sandboxes() as sandboxes, RuntimeBench(sizes.runtime) as workflows:
        lat = Latency(sandboxes, sizes.latency, sizes.slow, sizes.slow)
        put = Throughput(sandboxes, sizes.throughput)
        commands = StartupBench(sizes.startup)
        for round_ in range(sizes.rounds):
            progress(f"round {round_ + 1}/{sizes.rounds}: latency")
            await lat.round()
            progress(f"round {round_ + 1}/{sizes.rounds}: throughput")
            await put.round()
            progress(f"round {round_ + 1}/{sizes.rounds}: runtime")
            await workflows.round()
            progress(f"round {round_ + 1}/{sizes.rounds}: start-up")
            await asyncio.to_thread(commands.round)
        progress("memory")
        await asyncio.sleep(SETTLE_S)
        footprints = memory.sandbox_memory()
        bare = memory.bare_interpreter()
    progress("")
    print(file=sys.stderr)

    floor, bare_floor = lat.p50("fork floor"), lat.p50("bare fork floor")
    process, worker = lat.p50("corral process"), lat.p50("corral worker")
    rows = []
    for name, value, target in (
        ("process", process, latency.TARGET_FLOOR_RATIO),
        ("worker", worker, latency.TARGET_WORKER_FLOOR_RATIO),
    ):
        apart = lat.p50(f"corral {name}, apart")
        rows += [
            ratio_row(f"{name} p50 / bare fork floor", value, bare_floor, "ms", at_most=target,
                      note=BARE_FLOOR_NOTE if name == "process" else ""),
            ratio_row(f"{name} p50 / bare fork floor, {GAP_MS} ms apart", apart, bare_floor,
                      "ms", at_most=target,
                      note=f"each after {GAP_MS} ms idle, as sporadic callers see it"),
            ratio_row(f"{name} p50 {GAP_MS} ms apart / back to back", apart, value, "ms",
                      at_most=latency.TARGET_APART_RATIO),
            ratio_row(f"{name} p95 / p50", lat.p95(f"corral {name}"), value, "ms",
                      at_most=latency.TARGET_P95_RATIO,
                      note=f"{GAP_MS} ms apart: p95 {lat.p95(f'corral {name}, apart'):.3f} ms"),
        ]  # fmt: skip
    rows += [
        ratio_row("process p50 / fork floor", process, floor, "ms",
                  note="fork floor timed in this host, whose size it pays"),
        ratio_row("worker p50 / fork floor", worker, floor, "ms"),
        ratio_row(f"fork floor {GAP_MS} ms apart / back to back", lat.p50("fork floor, apart"),
                  floor, "ms"),
        ratio_row("process p50 / fresh interpreter", process, lat.p50("fresh interpreter"),
                  "ms"),
    ]  # fmt: skip
    if "bubblewrap" in lat.samples:
        rows.append(ratio_row("process p50 / bubblewrap", process, lat.p50("bubblewrap"), "ms",
                              note="fresh interpreter in bwrap --unshare-all"))  # fmt: skip
    else:
        rows.append(Row("process p50 / bubblewrap", process, None, "ms", None, "", None,
                        "bwrap not installed"))  # fmt: skip
    pool = get_settings().worker_pool_size
    for concurrency in put.levels:
        at_pool = concurrency == pool
        rows.append(ratio_row(
            f"throughput x{concurrency}{' (pool)' if at_pool else ''}: worker / process",
            put.rate("worker", concurrency), put.rate("process", concurrency), "/s",
            at_least=latency.TARGET_WORKER_THROUGHPUT if at_pool else None,
        ))  # fmt: skip
    rows += [
        memory_row("zygote", footprints.zygotes, bare),
        memory_row("idle worker", footprints.workers, bare),
        ratio_row("runtime p50 / bare execution", workflows.p50("runtime"),
                  workflows.p50("bare"), "ms", at_most=runtime.TARGET_RATIO),
        ratio_row("import corral / bare python", commands.p50("import"), commands.p50("bare"),
                  "ms", at_most=startup.TARGET_IMPORT_RATIO,
                  note="whole commands: python3 -I -c 'import corral' / python3 -I -c pass"),
        ratio_row("corral run / bare python", commands.p50("run"), commands.p50("bare"), "ms",
                  at_most=startup.TARGET_RUN_RATIO,
                  note="corral run examples/hello.py --json, zygote start and clean-up "
                       "included"),
    ]  # fmt: skip
    details = {
        "latency_ms": lat.summary(),
        "throughput_per_s": {
            f"{name} x{c}": round(put.rate(name, c), 1) for name, c in put.elapsed
        },
        "runtime_ms": {
            name: {
                "n": len(workflows.times[name]),
                "p50": round(workflows.p50(name), 3),
                "p95": round(workflows.p95(name), 3),
            }
            for name in ("bare", "runtime")
        },
        "startup_ms": {name: round(commands.p50(name), 1) for name in startup.COMMANDS},
        "memory_mb": {"bare interpreter": asdict(bare), **asdict(footprints)},
        "machine": {
            "cpus": _cpus(),
            "python": platform.python_version(),
            "worker_pool_size": pool,
            "rounds": sizes.rounds,
        },
    }
    return rows, details


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 3 if unit == "ms" and value < 10 else 1
    return f"{value:.{digits}f} {unit}"


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width table, notes under the rows that have one."""
    lines = [f"{'check':<46}{'value':>13}{'baseline':>13}{'ratio':>9}  {'target':<10}verdict"]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            f"{row.check:<46}{_figure(row.value, row.unit):>13}"
            f"{_figure(row.baseline, row.unit):>13}{ratio:>9}  {row.target or '-':<10}"
            f"{row.verdict}"
        )
        if row.note:
            lines.append(f"{'':<4}({row.note})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds: a smoke run")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = Sizes(
            args.rounds, sizes.latency, sizes.slow, sizes.throughput, sizes.runtime, sizes.startup
        )
    rows, details = asyncio.run(measure(sizes))
    met = all(row.passed is not False for row in rows)
    if args.json:
        document = {
            "ok": met,
            "rows": [{**asdict(row), "verdict": row.verdict} for row in rows],
            "details": details,
        }
        print(json.dumps(document, indent=2))
    else:
        print(table(rows))
        latencies = details["latency_ms"]
        assert isinstance(latencies, dict)
        print("\nlatency p50 / p95 (ms): " + ", ".join(
            f"{name} {row['p50_ms']:.2f} / {row['p95_ms']:.2f}" for name, row in latencies.items()
        ))  # fmt: skip
        print(f"{'all targets met' if met else 'TARGETS MISSED'} "
              f"({_cpus()} cpus, {sizes.rounds} rounds)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
