"""The runtime's cost over a bare execution of the same handler, measured in one run.

    python bench/runtime.py [--rounds N] [--per-round N] [--json]

Interleaved round by round on one process-backend sandbox:

- bare: `NodeSandbox.execute()` of a connector's handler (no HTTP: what is
  measured is corral's own work);
- runtime: a one-node workflow calling that handler through WorkflowRuntime
  (params contract, templates, idempotency claim and result, circuit breaker
  admission and record, events) on the embedded SQLite store, a fresh run id
  each time (so every node really runs).

Target: runtime p50 at most 1.5x bare. `bench/run.py` uses RuntimeBench.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework
from corral.runtime import WorkflowRuntime

TARGET_RATIO = 1.5
WARM_EXECUTIONS = 20
HANDLER = "def echo(params, context):\n    return {'echo': params['n'] + 1}\n"
DEFINITION = {
    "id": "bench",
    "actions": [{"id": "echo", "params": {"type": "object", "required": ["n"],
                                          "properties": {"n": {"type": "integer"}}}}],
}  # fmt: skip
WORKFLOW = {
    "id": "bench",
    "nodes": [{"id": "echo", "app": "bench", "function": "echo", "params": {"n": "{{ input.n }}"}}],
}


def _catalog(root: Path) -> Path:
    folder = root / "catalog" / "bench"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(DEFINITION))
    (folder / "handlers.py").write_text(HANDLER)
    return folder.parent


class RuntimeBench:
    """A process-backend sandbox and a WorkflowRuntime on it (embedded store in a temporary
    directory); each round times bare executions, then one-node workflows, on it."""

    def __init__(self, per_round: int) -> None:
        self.per_round = per_round
        self.times: dict[str, list[float]] = {"bare": [], "runtime": []}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> RuntimeBench:
        async with contextlib.AsyncExitStack() as stack:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-")))
            settings = load_settings(CORRAL_STATE_DIR=str(root / "state"))
            self.sandbox = stack.enter_context(
                NodeSandbox(executor="process", limits=Limits(max_memory_mb=64),
                            settings=settings)
            )  # fmt: skip
            framework = ConnectorFramework([_catalog(root)])
            self.runtime = await stack.enter_async_context(
                WorkflowRuntime(settings, framework=framework, sandbox=self.sandbox)
            )
            for n in range(WARM_EXECUTIONS):
                await self.bare(n)
                await self.through_runtime(n)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def bare(self, n: int) -> None:
        """The handler, executed directly."""
        result = await self.sandbox.execute(
            HANDLER, entry_point="echo", params={"n": n}, context={"connection": {}}
        )
        assert result.output == {"echo": n + 1}, result.output

    async def through_runtime(self, n: int) -> None:
        """The handler as the one node of a workflow, under a fresh run id."""
        run = await self.runtime.run_workflow(WORKFLOW, input={"n": n}, run_id=uuid.uuid4().hex)
        assert run.status == "succeeded", run.to_dict()

    async def round(self) -> None:
        """`per_round` bare executions, then as many workflows."""
        calls: tuple[tuple[str, Callable[[int], Awaitable[None]]], ...] = (
            ("bare", self.bare), ("runtime", self.through_runtime)
        )  # fmt: skip
        for name, call in calls:
            for n in range(self.per_round):
                started = time.perf_counter()
                await call(n)
                self.times[name].append((time.perf_counter() - started) * 1000)

    def p50(self, name: str) -> float:
        """The median of `bare` or `runtime`, in ms."""
        return statistics.median(self.times[name])

    def p95(self, name: str) -> float:
        return statistics.quantiles(self.times[name], n=20)[-1]

    @property
    def ratio(self) -> float:
        """Runtime p50 over bare p50."""
        return self.p50("runtime") / self.p50("bare")


async def measure(rounds: int, per_round: int) -> RuntimeBench:
    """Bare executions and workflows, `rounds` rounds of `per_round` each."""
    async with RuntimeBench(per_round) as bench:
        for _ in range(rounds):
            await bench.round()
    return bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bench = asyncio.run(measure(args.rounds, args.per_round))
    names = ("bare", "runtime")
    ratio = bench.ratio
    if args.json:
        print(json.dumps({"p50_ms": {name: bench.p50(name) for name in names},
                          "p95_ms": {name: bench.p95(name) for name in names},
                          "ratio": ratio}))  # fmt: skip
    else:
        print(f"{'method':<10}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'x bare':>9}")
        for name in names:
            p50 = bench.p50(name)
            print(f"{name:<10}{len(bench.times[name]):>6}{p50:>10.3f}"
                  f"{bench.p95(name):>10.3f}{p50 / bench.p50('bare'):>9.2f}")  # fmt: skip
        verdict = "met " if ratio <= TARGET_RATIO else "MISSED"
        print(f"{verdict} runtime p50 <= {TARGET_RATIO}x a bare execution ({ratio:.2f}x)")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
