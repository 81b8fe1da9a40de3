"""The runtime's cost over a bare execution of the same handler, measured in one run.

    python bench/runtime.py [--rounds N] [--per-round N] [--json]

Interleaved round by round on one process-backend sandbox:

- bare: `NodeSandbox.execute()` of a connector's handler (no HTTP: what is
  measured is corral's own work);
- runtime: a one-node workflow calling that handler through WorkflowRuntime
  (params contract, templates, idempotency claim and result, circuit breaker
  admission and record, events) on the embedded SQLite store, a fresh run id
  each time (so every node really runs).

Target: runtime p50 at most 1.5x bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework
from corral.runtime import WorkflowRuntime

TARGET_RATIO = 1.5
HANDLER = "def echo(params, context):\n    return {'echo': params['n'] + 1}\n"
DEFINITION = {
    "id": "bench",
    "actions": [{"id": "echo", "params": {"type": "object", "required": ["n"],
                                          "properties": {"n": {"type": "integer"}}}}],
}  # fmt: skip
WORKFLOW = {"id": "bench", "nodes": [
    {"id": "echo", "app": "bench", "function": "echo", "params": {"n": "{{ input.n }}"}}]}


def _catalog(root: Path) -> Path:
    folder = root / "catalog" / "bench"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(DEFINITION))
    (folder / "handlers.py").write_text(HANDLER)
    return folder.parent


async def measure(rounds: int, per_round: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as root:
        settings = load_settings(CORRAL_STATE_DIR=str(Path(root) / "state"))
        with NodeSandbox(
            executor="process", limits=Limits(max_memory_mb=64), settings=settings
        ) as sandbox:
            runtime = WorkflowRuntime(
                settings, framework=ConnectorFramework([_catalog(Path(root))]), sandbox=sandbox
            )
            async with runtime:
                times: dict[str, list[float]] = {"bare": [], "runtime": []}

                async def bare(n: int) -> None:
                    await sandbox.execute(HANDLER, entry_point="echo", params={"n": n},
                                          context={"connection": {}})  # fmt: skip

                async def through_runtime(n: int) -> None:
                    run = await runtime.run_workflow(
                        WORKFLOW, input={"n": n}, run_id=uuid.uuid4().hex
                    )
                    assert run.status == "succeeded", run.to_dict()

                for warm in range(20):
                    await bare(warm)
                    await through_runtime(warm)
                for _ in range(rounds):
                    for name, call in (("bare", bare), ("runtime", through_runtime)):
                        for n in range(per_round):
                            started = time.perf_counter()
                            await call(n)
                            times[name].append((time.perf_counter() - started) * 1000)
                return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    times = asyncio.run(measure(args.rounds, args.per_round))
    p50 = {name: statistics.median(values) for name, values in times.items()}
    p95 = {name: statistics.quantiles(values, n=20)[-1] for name, values in times.items()}
    ratio = p50["runtime"] / p50["bare"]
    if args.json:
        print(json.dumps({"p50_ms": p50, "p95_ms": p95, "ratio": ratio}))
    else:
        print(f"{'method':<10}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'x bare':>9}")
        for name in ("bare", "runtime"):
            print(f"{name:<10}{len(times[name]):>6}{p50[name]:>10.3f}{p95[name]:>10.3f}"
                  f"{p50[name] / p50['bare']:>9.2f}")  # fmt: skip
        verdict = "met " if ratio <= TARGET_RATIO else "MISSED"
        print(f"{verdict} runtime p50 <= {TARGET_RATIO}x a bare execution ({ratio:.2f}x)")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
