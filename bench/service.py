"""The service's cost over the in-process runtime, measured in one run.

    python bench/service.py [--runs N] [--concurrency N] [--json]

For a one-node workflow (the handler of bench/runtime.py), with `--concurrency` (8) runs
in flight at a time:

- in-process: WorkflowRuntime.run_workflow in this process, a fresh run id each;
- embedded: `corral api` (inline worker off) and one `corral worker` (concurrency as
  above) on the embedded SQLite queue and records, runs started with POST
  /api/workflows/ID/runs and awaited with GET /api/runs/ID?wait_s=30 (the API answers
  once the run has finished);
- redis: the same with CORRAL_REDIS_URL on a redis-server this script starts on
  127.0.0.1 (skipped when redis-server is not installed).

Prints runs per second and p50/p95 from start (POST, or the call) to finished for each,
and the ratios of the targets: service per-run cost (1 / runs per second) at most 2x the
in-process one, and more than n8n's published 220 executions per second for one instance.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
from runtime import WORKFLOW, _catalog

from corral.config import load_settings
from corral.executors import ConnectorFramework
from corral.runtime import WorkflowRuntime

TARGET_OVERHEAD = 2.0
N8N_RUNS_PER_S = 220.0
WARM_RUNS = 16
WAIT = {"wait_s": "30"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stats(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "runs_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p95_ms": round(statistics.quantiles(latencies, n=20)[-1] * 1000, 2),
    }


async def _closed_loop(
    one: Callable[[int], Awaitable[None]], runs: int, concurrency: int
) -> dict[str, float]:
    """`runs` calls of `one`, `concurrency` in flight; their latencies and the rate."""
    latencies: list[float] = []
    counter = iter(range(runs))

    async def lane() -> None:
        for n in counter:
            started = time.perf_counter()
            await one(n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return _stats(latencies, time.perf_counter() - started)


async def in_process(
    root: Path, runs: int, concurrency: int, executor: str = "worker"
) -> dict[str, float]:
    settings = load_settings(
        CORRAL_STATE_DIR=str(root / "inproc"), SANDBOX_MAX_MEMORY_MB="64",
        SANDBOX_EXECUTOR=executor,
    )  # fmt: skip
    framework = ConnectorFramework([root / "catalog"])
    async with WorkflowRuntime(settings, framework=framework) as runtime:

        async def one(n: int) -> None:
            run = await runtime.run_workflow(WORKFLOW, input={"n": n}, run_id=uuid.uuid4().hex)
            assert run.status == "succeeded", run.to_dict()

        await _closed_loop(one, WARM_RUNS, concurrency)
        return await _closed_loop(one, runs, concurrency)


@contextlib.contextmanager
def _processes(env: dict[str, str], concurrency: int) -> Iterator[str]:
    """`corral api` and one `corral worker`; the API's URL."""
    env = {**env, "ENABLE_INLINE_WORKER": "false", "CORRAL_WORKER_CONCURRENCY": str(concurrency)}
    started: list[subprocess.Popen[str]] = []
    try:
        api = subprocess.Popen(
            [sys.executable, "-m", "corral", "api"], env=env, stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        started.append(api)
        started.append(subprocess.Popen(
            [sys.executable, "-m", "corral", "worker"], env=env, stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True, text=True,
        ))  # fmt: skip
        assert api.stderr is not None
        for line in api.stderr:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                yield match.group(1)
                return
        raise RuntimeError("corral api did not start")
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def through_service(url: str, runs: int, concurrency: int) -> dict[str, float]:
    # aiohttp, not httpx: the load generator shares the machine's two cores with the
    # service, and httpx spent ~3 ms of CPU per run here, aiohttp ~0.7 ms.
    async with aiohttp.ClientSession(base_url=url) as client:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with client.get("/readyz") as answer:
                    if answer.status == 200:
                        break
            await asyncio.sleep(0.1)
        async with client.put("/api/workflows/bench", json=WORKFLOW) as answer:
            assert answer.status == 200, await answer.text()

        async def one(n: int) -> None:
            async with client.post("/api/workflows/bench/runs", json={"input": {"n": n}}) as answer:
                run_id = (await answer.json())["run_id"]
            while True:  # the API answers once the run has finished (or after WAIT_S)
                async with client.get(f"/api/runs/{run_id}", params=WAIT) as answer:
                    run = await answer.json()
                if run["status"] in ("succeeded", "failed", "cancelled"):
                    assert run["status"] == "succeeded", run
                    return

        await _closed_loop(one, WARM_RUNS, concurrency)
        return await _closed_loop(one, runs, concurrency)


@contextlib.contextmanager
def _redis(root: Path) -> Iterator[str | None]:
    server = shutil.which("redis-server")
    if server is None:
        yield None
        return
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--executor", choices=("worker", "process"), default="worker",
        help="the sandbox backend of every path (default: worker, the targets' backend)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        root = Path(tmp)
        _catalog(root)
        base = {name: value for name, value in os.environ.items()
                if not name.startswith(("CORRAL_", "SANDBOX_", "ENABLE_INLINE"))}  # fmt: skip
        base.update({"CORRAL_CONNECTORS_DIR": str(root / "catalog"), "CORRAL_API_PORT": "0",
                     "SANDBOX_MAX_MEMORY_MB": "64", "SANDBOX_EXECUTOR": args.executor})  # fmt: skip
        results["in-process"] = asyncio.run(
            in_process(root, args.runs, args.concurrency, args.executor)
        )
        with _processes({**base, "CORRAL_STATE_DIR": str(root / "embedded")},
                        args.concurrency) as url:  # fmt: skip
            results["embedded"] = asyncio.run(through_service(url, args.runs, args.concurrency))
        with _redis(root) as redis_url:
            if redis_url is not None:
                env = {**base, "CORRAL_STATE_DIR": str(root / "redis"),
                       "CORRAL_REDIS_URL": redis_url}  # fmt: skip
                with _processes(env, args.concurrency) as url:
                    results["redis"] = asyncio.run(
                        through_service(url, args.runs, args.concurrency)
                    )
    inproc = results["in-process"]["runs_per_s"]
    for name in ("embedded", "redis"):
        if name in results:
            results[name]["overhead_x"] = round(inproc / results[name]["runs_per_s"], 2)
    if args.json:
        print(json.dumps({"concurrency": args.concurrency, "runs": args.runs, **results}))
        return 0
    print(f"{args.runs} one-node runs, {args.concurrency} in flight, {args.executor} executor")
    print(f"{'path':<12}{'runs/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'cost x':>10}")
    for name, row in results.items():
        cost = f"{row.get('overhead_x', 1.0):.2f}"
        print(f"{name:<12}{row['runs_per_s']:>10}{row['p50_ms']:>10}{row['p95_ms']:>10}{cost:>10}")
    print(f"targets: service cost at most {TARGET_OVERHEAD}x in-process; more than "
          f"{N8N_RUNS_PER_S:.0f} runs/s (n8n, one instance)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
