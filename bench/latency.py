"""Latency of one trivial connector execution, against its baselines, in one run.

    python bench/latency.py [--rounds N] [--per-round N] [--json]

Measures, interleaved round by round so that every method sees the same
machine:

- fork floor: `os.fork()` from this process, the child answers over a pipe
  and exits, the parent reads and reaps it (the least a fresh process costs);
- fresh interpreter: `python -I -S` per execution, how codejail-style
  runners pay;
- corral process: `NodeSandbox(executor="process").execute()` on the same
  trivial connector (warm zygote, fresh child, own cgroups, RestrictedPython);
- corral worker: the same on the worker backend (a warm pool of long-lived
  workers).

Then throughput: as many executions in flight as the worker pool has
workers, on each backend, for the same number of executions.

Prints p50/p95 per method, executions per second per backend, and the
ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from corral import Limits, NodeSandbox
from corral.config import get_settings

CONNECTOR = 'def run(params, context):\n    return {"echo": params["n"] + 1}\n'
FRESH_SCRIPT = (
    "import json, sys\n"
    "params = json.loads(sys.stdin.read())\n"
    'print(json.dumps({"echo": params["n"] + 1}))\n'
)
TARGET_FLOOR_RATIO = 2.0  # corral process p50 at most this many times the fork floor
TARGET_FRESH_SPEEDUP = 5.0  # corral process at least this many times faster than fresh python
TARGET_WORKER_FLOOR_RATIO = 0.25  # corral worker p50 at most this fraction of the fork floor
TARGET_WORKER_THROUGHPUT = 5.0  # worker executions per second over the process backend's


def fork_floor(n: int) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps({"echo": n + 1}).encode())
        os._exit(0)
    os.close(write_end)
    json.loads(os.read(read_end, 4096))
    os.close(read_end)
    os.waitpid(pid, 0)


def fresh_interpreter(n: int) -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", FRESH_SCRIPT],
        input=json.dumps({"n": n}).encode(),
        capture_output=True,
        check=True,
    )
    json.loads(done.stdout)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(rounds: int, per_round: int, fresh_per_round: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        "fork floor": [], "fresh interpreter": [], "corral process": [], "corral worker": []
    }  # fmt: skip
    limits = Limits(max_memory_mb=64, max_cpu_ms=1000)
    with (
        NodeSandbox(executor="process", limits=limits) as process,
        NodeSandbox(executor="worker", limits=limits) as worker,
    ):
        sandboxes = {"corral process": process, "corral worker": worker}
        for sandbox in sandboxes.values():
            sandbox.start()
            for n in range(20):  # warm: zygote, compile cache, spares, workers
                await sandbox.execute(CONNECTOR, params={"n": n})
        for round_ in range(rounds):
            print(f"\rround {round_ + 1}/{rounds}", end="", file=sys.stderr, flush=True)
            methods: list[tuple[str, int, Callable[[int], object]]] = [
                ("fork floor", per_round, fork_floor),
                ("fresh interpreter", fresh_per_round, fresh_interpreter),
            ]
            for name, count, run in methods:
                for n in range(count):
                    start = time.perf_counter()
                    run(n)
                    samples[name].append((time.perf_counter() - start) * 1000)
            for name, sandbox in sandboxes.items():
                for n in range(per_round):
                    start = time.perf_counter()
                    result = await sandbox.execute(CONNECTOR, params={"n": n})
                    samples[name].append((time.perf_counter() - start) * 1000)
                    assert result.output == {"echo": n + 1}
        print(file=sys.stderr)
    return samples


async def _stream(sandbox: NodeSandbox, pending: list[int]) -> None:
    """Execute until `pending` is empty (shared by the streams in flight)."""
    while pending:
        n = pending.pop()
        assert (await sandbox.execute(CONNECTOR, params={"n": n})).output == {"echo": n + 1}


async def throughput(executions: int, concurrency: int) -> dict[str, float]:
    """Executions per second with `concurrency` in flight, on each backend."""
    rates = {}
    limits = Limits(max_memory_mb=64, max_cpu_ms=1000)
    for executor in ("process", "worker"):
        with NodeSandbox(executor=executor, limits=limits) as sandbox:
            sandbox.start()
            for n in range(20):
                await sandbox.execute(CONNECTOR, params={"n": n})
            pending = list(range(executions))
            start = time.perf_counter()
            await asyncio.gather(*(_stream(sandbox, pending) for _ in range(concurrency)))
            rates[executor] = executions / (time.perf_counter() - start)
    return rates


def report(samples: dict[str, list[float]], rates: dict[str, float]) -> dict[str, object]:
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    floor, fresh = p50["fork floor"], p50["fresh interpreter"]
    process, worker = p50["corral process"], p50["corral worker"]
    speedup = rates["worker"] / rates["process"]
    return {
        "methods": {
            name: {
                "n": len(values),
                "p50_ms": round(p50[name], 3),
                "p95_ms": round(percentile(values, 0.95), 3),
                "vs_floor": round(p50[name] / floor, 2),
            }
            for name, values in samples.items()
        },
        "throughput_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "process_vs_floor": round(process / floor, 2),
        "fresh_vs_process": round(fresh / process, 2),
        "worker_vs_floor": round(worker / floor, 2),
        "worker_vs_process_throughput": round(speedup, 2),
        "targets": {
            f"process p50 <= {TARGET_FLOOR_RATIO}x fork floor": process / floor
            <= TARGET_FLOOR_RATIO,
            f"process >= {TARGET_FRESH_SPEEDUP}x faster than a fresh interpreter": fresh / process
            >= TARGET_FRESH_SPEEDUP,
            f"worker p50 <= {TARGET_WORKER_FLOOR_RATIO}x fork floor": worker / floor
            <= TARGET_WORKER_FLOOR_RATIO,
            f"worker throughput >= {TARGET_WORKER_THROUGHPUT}x process": speedup
            >= TARGET_WORKER_THROUGHPUT,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=50, help="fork and corral samples a round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    fresh_per_round = max(1, args.per_round // 5)  # ~20 ms each: fewer keep the run short
    samples = asyncio.run(measure(args.rounds, args.per_round, fresh_per_round))
    concurrency = get_settings().worker_pool_size
    rates = asyncio.run(throughput(args.rounds * args.per_round, concurrency))
    result = report(samples, rates)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'method':<20}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'x floor':>10}")
    for name, row in result["methods"].items():  # type: ignore[union-attr]
        print(f"{name:<20}{row['n']:>6}{row['p50_ms']:>10.3f}{row['p95_ms']:>10.3f}"
              f"{row['vs_floor']:>10.2f}")  # fmt: skip
    print(f"\nthroughput at {concurrency} in flight: process {rates['process']:.0f}/s, "
          f"worker {rates['worker']:.0f}/s")  # fmt: skip
    print(f"process / fork floor:        {result['process_vs_floor']:.2f}x")
    print(f"fresh interpreter / process: {result['fresh_vs_process']:.2f}x")
    print(f"worker / fork floor:         {result['worker_vs_floor']:.2f}x")
    print(f"worker / process throughput: {result['worker_vs_process_throughput']:.2f}x")
    for target, met in result["targets"].items():  # type: ignore[union-attr]
        print(f"{'met ' if met else 'MISSED'} {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
