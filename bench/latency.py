"""Latency of one trivial connector execution, against its baselines, in one run.

    python bench/latency.py [--rounds N] [--per-round N] [--json]

Measures, interleaved round by round so that every method sees the same
machine:

- fork floor: `os.fork()` from this process, the child answers over a pipe
  and exits, the parent reads and reaps it (a fork copies the caller's page
  tables, so it costs more the larger the caller: informs only);
- bare fork floor: the same fork, timed inside a bare `python -I -S` (the
  least a fork costs any Python process, whatever its caller's size): the
  baseline of the targets;
- fresh interpreter: `python -I -S` per execution, how codejail-style
  runners pay;
- bubblewrap: the same fresh interpreter inside `bwrap --unshare-all` (a
  namespace sandbox per execution), where bwrap is installed;
- corral process: `NodeSandbox(executor="process").execute()` on the same
  trivial connector (warm zygote, fresh child, own cgroups, RestrictedPython);
- corral worker: the same on the worker backend (a warm pool of long-lived
  workers).

The fork floor and both backends are also timed with the machine idle
before each execution (`GAP_S` apart), as a caller with sporadic traffic
sees them: kernel paths that stay fast only while they are busy, and
threads that sleep, show there. Targets: each backend's p50 against the
bare fork floor, back to back and `GAP_S` apart; `GAP_S` apart within
TARGET_APART_RATIO of its own back-to-back p50; p95 within TARGET_P95_RATIO
of p50; worker throughput at the pool's size against the process backend's.

Then throughput: executions per second of each backend with 1, 2 and as
many executions in flight as the worker pool has workers, also round by
round.

Prints p50/p95 per method, executions per second per backend, and the
ratios the targets are stated in. `bench/run.py` uses the classes here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

from corral import Limits, NodeSandbox
from corral.config import get_settings

CONNECTOR = 'def run(params, context):\n    return {"echo": params["n"] + 1}\n'
FRESH_SCRIPT = (
    "import json, sys\n"
    "params = json.loads(sys.stdin.read())\n"
    'print(json.dumps({"echo": params["n"] + 1}))\n'
)
LIMITS = Limits(max_memory_mb=64, max_cpu_ms=1000)
WARM_EXECUTIONS = 20  # zygote, compile cache, spares, every worker of the pool
BACKENDS = ("process", "worker")
#: A fresh interpreter per execution in its own namespaces, the filesystem read-only.
BWRAP_ARGS = ("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
              "--die-with-parent", "--new-session")  # fmt: skip
GAP_S = 0.05  # idle time before each "apart" sample
#: The targets, each against the bare fork floor (a fork inside a bare `python -I -S`, whatever
#: the caller's size), back to back and with each execution GAP_S after the last.
TARGET_FLOOR_RATIO = 2.0  # corral process p50 at most this many times the bare fork floor
TARGET_WORKER_FLOOR_RATIO = 0.3  # corral worker p50 at most this fraction of the bare fork floor
TARGET_APART_RATIO = 1.3  # each backend's p50 GAP_S apart over its own back-to-back p50
TARGET_P95_RATIO = 2.0  # each backend's p95 over its p50
TARGET_WORKER_THROUGHPUT = 8.0  # worker executions per second over the process backend's


def fork_floor(n: int) -> None:
    """One raw fork: the child answers over a pipe and exits; read and reaped here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps({"echo": n + 1}).encode())
        os._exit(0)
    os.close(write_end)
    json.loads(os.read(read_end, 4096))
    os.close(read_end)
    os.waitpid(pid, 0)


# The same fork floor, in a bare interpreter: fork_floor's own source, timed in a loop.
BARE_FORK_SCRIPT = f"""\
import json, os, sys, time
{inspect.getsource(fork_floor)}
samples = []
for n in range(int(sys.argv[1])):
    start = time.perf_counter()
    fork_floor(n)
    samples.append((time.perf_counter() - start) * 1000)
print(json.dumps(samples))
"""


def bare_fork_floor(count: int) -> list[float]:
    """`count` fork floors timed inside a bare interpreter, in ms."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", BARE_FORK_SCRIPT, str(count)],
                          capture_output=True, check=True)  # fmt: skip
    return [float(sample) for sample in json.loads(done.stdout)]


def timed(run: Callable[[int], None]) -> Callable[[int], list[float]]:
    """A sampler: `count` calls of `run`, each timed, in ms."""

    def sampler(count: int) -> list[float]:
        samples = []
        for n in range(count):
            start = time.perf_counter()
            run(n)
            samples.append((time.perf_counter() - start) * 1000)
        return samples

    return sampler


def _interpreter(n: int, prefix: tuple[str, ...] = ()) -> None:
    done = subprocess.run(
        [*prefix, sys.executable, "-I", "-S", "-c", FRESH_SCRIPT],
        input=json.dumps({"n": n}).encode(),
        capture_output=True,
        check=True,
    )
    assert json.loads(done.stdout) == {"echo": n + 1}


def fresh_interpreter(n: int) -> None:
    """A fresh `python -I -S` answers one execution."""
    _interpreter(n)


def bwrap() -> str | None:
    """The bubblewrap binary, or None when it is not installed."""
    return shutil.which("bwrap")


def bwrap_interpreter(n: int) -> None:
    """A fresh interpreter answers one execution inside bubblewrap's namespaces."""
    binary = bwrap()
    assert binary is not None
    _interpreter(n, (binary, *BWRAP_ARGS))


def percentile(samples: list[float], q: float) -> float:
    """The `q` quantile of `samples` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def progress(text: str) -> None:
    """A progress line on stderr, overwritten by the next."""
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


async def execute_checked(sandbox: NodeSandbox, n: int) -> None:
    """One execution of the trivial connector, its answer checked."""
    result = await sandbox.execute(CONNECTOR, params={"n": n})
    assert result.output == {"echo": n + 1}, result.output


@contextlib.asynccontextmanager
async def warm_sandboxes() -> AsyncIterator[dict[str, NodeSandbox]]:
    """One started and warmed sandbox per backend, closed on the way out."""
    with contextlib.ExitStack() as stack:
        sandboxes = {
            name: stack.enter_context(NodeSandbox(executor=name, limits=LIMITS))
            for name in BACKENDS
        }
        for sandbox in sandboxes.values():
            sandbox.start()
            in_flight = get_settings().worker_pool_size  # so that every worker is warm
            for n in range(WARM_EXECUTIONS):
                await asyncio.gather(*(execute_checked(sandbox, n) for _ in range(in_flight)))
        yield sandboxes


class Latency:
    """Per-execution latency of every method, sampled one method after another each round."""

    def __init__(
        self,
        sandboxes: dict[str, NodeSandbox],
        per_round: int,
        slow_per_round: int,
        apart_per_round: int = 0,
    ) -> None:
        self.sandboxes = sandboxes
        self.per_round = per_round
        self.slow_per_round = slow_per_round  # fresh interpreters take ~20 ms each
        self.apart_per_round = apart_per_round  # each waits GAP_S first
        self.baselines: list[tuple[str, int, Callable[[int], list[float]]]] = [
            ("fork floor", per_round, timed(fork_floor)),
            ("bare fork floor", per_round, bare_fork_floor),
            ("fresh interpreter", slow_per_round, timed(fresh_interpreter)),
        ]
        if bwrap() is not None:
            self.baselines.append(("bubblewrap", slow_per_round, timed(bwrap_interpreter)))
        self.samples: dict[str, list[float]] = {name: [] for name, _, _ in self.baselines}
        self.samples.update({f"corral {name}": [] for name in sandboxes})
        if apart_per_round:
            self.samples["fork floor, apart"] = []
            self.samples.update({f"corral {name}, apart": [] for name in sandboxes})
        self.rounds = 0

    async def round(self) -> None:
        """One sample run of every method."""
        for name, count, sampler in self.baselines:
            self.samples[name] += sampler(count)
        names = list(self.sandboxes)
        if self.rounds % 2:  # neither backend always runs right after the baselines
            names.reverse()
        for name in names:
            sandbox, samples = self.sandboxes[name], self.samples[f"corral {name}"]
            for n in range(self.per_round):
                start = time.perf_counter()
                await execute_checked(sandbox, n)
                samples.append((time.perf_counter() - start) * 1000)
        for n in range(self.apart_per_round):
            await asyncio.sleep(GAP_S)
            self.samples["fork floor, apart"] += timed(fork_floor)(1)
            for name in names:
                await asyncio.sleep(GAP_S)
                start = time.perf_counter()
                await execute_checked(self.sandboxes[name], n)
                self.samples[f"corral {name}, apart"].append((time.perf_counter() - start) * 1000)
        self.rounds += 1

    def p50(self, name: str) -> float:
        """The median latency of a method, in ms."""
        return statistics.median(self.samples[name])

    def p95(self, name: str) -> float:
        """The 95th percentile latency of a method, in ms."""
        return percentile(self.samples[name], 0.95)

    def summary(self) -> dict[str, dict[str, float]]:
        """n, p50 and p95 (ms) per method, and its p50 over the fork floor's."""
        floor = self.p50("fork floor")
        return {
            name: {
                "n": len(values),
                "p50_ms": round(self.p50(name), 3),
                "p95_ms": round(percentile(values, 0.95), 3),
                "vs_floor": round(self.p50(name) / floor, 3),
            }
            for name, values in self.samples.items()
        }


async def _stream(sandbox: NodeSandbox, pending: list[int]) -> None:
    """Execute until `pending` is empty (shared by the streams in flight)."""
    while pending:
        await execute_checked(sandbox, pending.pop())


def concurrencies() -> list[int]:
    """The concurrencies throughput is measured at: 1, 2 and the worker pool's size."""
    return sorted({1, 2, get_settings().worker_pool_size})


class Throughput:
    """Executions per second of each backend at each concurrency, accumulated over rounds."""

    def __init__(self, sandboxes: dict[str, NodeSandbox], per_round: int) -> None:
        self.sandboxes = sandboxes
        self.per_round = per_round  # executions of each backend at each concurrency a round
        self.levels = concurrencies()
        self.elapsed = {(name, c): 0.0 for name in sandboxes for c in self.levels}
        self.done = dict.fromkeys(self.elapsed, 0)
        self.rounds = 0

    async def round(self) -> None:
        """`per_round` executions of each backend at each concurrency."""
        order = list(self.elapsed)
        if self.rounds % 2:
            order.reverse()
        for name, concurrency in order:
            pending = list(range(self.per_round))
            start = time.perf_counter()
            await asyncio.gather(
                *(_stream(self.sandboxes[name], pending) for _ in range(concurrency))
            )
            self.elapsed[name, concurrency] += time.perf_counter() - start
            self.done[name, concurrency] += self.per_round
        self.rounds += 1

    def rate(self, backend: str, concurrency: int) -> float:
        """Executions per second."""
        return self.done[backend, concurrency] / self.elapsed[backend, concurrency]


async def measure(
    rounds: int, per_round: int, slow_per_round: int, throughput_per_round: int
) -> tuple[Latency, Throughput]:
    """Latency and throughput, interleaved round by round."""
    async with warm_sandboxes() as sandboxes:
        latency = Latency(sandboxes, per_round, slow_per_round, slow_per_round)
        throughput = Throughput(sandboxes, throughput_per_round)
        for round_ in range(rounds):
            progress(f"round {round_ + 1}/{rounds}")
            await latency.round()
            await throughput.round()
        progress("")
    return latency, throughput


def targets(latency: Latency) -> dict[str, tuple[float, float, float, bool]]:
    """The latency targets: name -> (value, baseline, ratio, met). Every sample set of
    `latency` (the "apart" ones included) must hold some."""
    bare = latency.p50("bare fork floor")
    met: dict[str, tuple[float, float, float, bool]] = {}

    def check(name: str, value: float, baseline: float, at_most: float) -> None:
        met[name] = (value, baseline, value / baseline, value / baseline <= at_most)

    for backend, at_most in (
        ("process", TARGET_FLOOR_RATIO),
        ("worker", TARGET_WORKER_FLOOR_RATIO),
    ):
        own = latency.p50(f"corral {backend}")
        apart = latency.p50(f"corral {backend}, apart")
        check(f"{backend} p50 <= {at_most}x bare fork floor", own, bare, at_most)
        check(f"{backend} p50 {GAP_S * 1000:.0f} ms apart <= {at_most}x bare fork floor", apart,
              bare, at_most)  # fmt: skip
        check(f"{backend} p50 {GAP_S * 1000:.0f} ms apart <= {TARGET_APART_RATIO}x its own "
              "back to back", apart, own, TARGET_APART_RATIO)  # fmt: skip
        check(f"{backend} p95 <= {TARGET_P95_RATIO}x its p50",
              latency.p95(f"corral {backend}"), own, TARGET_P95_RATIO)  # fmt: skip
    return met


def report(latency: Latency, throughput: Throughput) -> dict[str, object]:
    """The figures and the targets, as one JSON-ready object."""
    floor, bare = latency.p50("fork floor"), latency.p50("bare fork floor")
    process, worker = latency.p50("corral process"), latency.p50("corral worker")
    pool = throughput.levels[-1]
    speedup = throughput.rate("worker", pool) / throughput.rate("process", pool)
    return {
        "methods": latency.summary(),
        "throughput_per_s": {
            f"{name} x{c}": round(throughput.rate(name, c), 1) for name, c in throughput.elapsed
        },
        "process_vs_floor": round(process / floor, 3),
        "process_vs_bare_floor": round(process / bare, 3),
        "process_vs_fresh": round(process / latency.p50("fresh interpreter"), 3),
        "worker_vs_floor": round(worker / floor, 3),
        "worker_vs_bare_floor": round(worker / bare, 3),
        "worker_vs_process_throughput": round(speedup, 2),
        "targets": {
            **{name: met for name, (_, _, _, met) in targets(latency).items()},
            f"worker throughput at {pool} in flight >= {TARGET_WORKER_THROUGHPUT}x process": speedup
            >= TARGET_WORKER_THROUGHPUT,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=50, help="fork and corral samples a round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    slow_per_round = max(1, args.per_round // 5)  # ~20 ms each: fewer keep the run short
    latency, throughput = asyncio.run(
        measure(args.rounds, args.per_round, slow_per_round, args.per_round)
    )
    result = report(latency, throughput)
    met = all(result["targets"].values())  # type: ignore[union-attr]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if met else 1
    print(f"{'method':<24}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'x floor':>10}")
    for name, row in result["methods"].items():  # type: ignore[union-attr]
        print(f"{name:<24}{row['n']:>6}{row['p50_ms']:>10.3f}{row['p95_ms']:>10.3f}"
              f"{row['vs_floor']:>10.2f}")  # fmt: skip
    print()
    for name, rate in result["throughput_per_s"].items():  # type: ignore[union-attr]
        print(f"throughput {name} in flight: {rate:.0f}/s")
    print(f"process / fork floor:        {result['process_vs_floor']:.2f}x")
    print(f"process / bare fork floor:   {result['process_vs_bare_floor']:.2f}x")
    print(f"process / fresh interpreter: {result['process_vs_fresh']:.2f}x")
    print(f"worker / fork floor:         {result['worker_vs_floor']:.2f}x")
    print(f"worker / bare fork floor:    {result['worker_vs_bare_floor']:.2f}x")
    print(f"worker / process throughput: {result['worker_vs_process_throughput']:.2f}x")
    for target, ok in result["targets"].items():  # type: ignore[union-attr]
        print(f"{'met ' if ok else 'MISSED'} {target}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
