"""The service's cost over the in-process runtime, measured in one run.

    python bench/service.py [--runs N] [--seconds S] [--rounds N] [--concurrency N] [--json]

For a one-node workflow (the handler of bench/runtime.py), with `--concurrency` (8) runs
in flight at a time:

- in-process: WorkflowRuntime.run_workflow in this process, a fresh run id each, for
  `--seconds` (2) a round (a fresh runtime each round, warmed up first);
- embedded: `corral api` (inline worker off) and one `corral worker` (concurrency as
  above) on the embedded SQLite queue and records, each run one request: POST
  /api/workflows/ID/runs?wait_s=30, which the API answers with the finished run (as a
  client that wants the result asks for it);
- redis: the same with CORRAL_REDIS_URL on a redis-server this script starts on
  127.0.0.1 (skipped when redis-server is not installed);
- embedded, POST+GET (info, no target): a client that starts the run with a plain POST
  and then asks for it with GET /api/runs/ID?wait_s=30, two requests per run.

The load generator shares the machine with the service: wrk (bench/service.lua) sends
the one-request runs for `--seconds` (2) a path and round, and checks that each answer is
a succeeded run. aiohttp, in this process, spent 0.35-0.7 ms of CPU a run here, about
10% of what a run costs the whole machine; where wrk is not installed it sends them,
`--runs` a path and round, and the header says so. aiohttp always sends POST+GET (one request
depends on the answer to the other, which wrk's scripts cannot express).

The paths take turns, `--rounds` (5) times: the VM's speed drifts by tens of percent
within a minute, and a round's ratio compares paths measured seconds apart. Prints, for
each, the median round's runs per second and p50/p95 from start (POST, or the call) to
finished; its per-run cost (1 / runs per second) against the in-process one ("cost x",
the median of each round's ratio, then the lowest and highest round's); and its
overhead, what the service adds to that cost, against the in-process cost ("overhead x"
= cost x - 1). The targets (the issue's words): "service overhead at most 2x the
in-process runtime path's per-run cost", and more than n8n's published 220 executions
per second for one instance. Exit status 1 when a service path misses a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
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
TWO_REQUESTS = "embedded, POST+GET"  # the info row: a client that polls for the result


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
    one: Callable[[int], Awaitable[None]],
    concurrency: int,
    *,
    runs: int | None = None,
    seconds: float | None = None,
) -> dict[str, float]:
    """Calls of `one`, `concurrency` in flight, `runs` of them or as many as start within
    `seconds`; their latencies and the rate."""
    latencies: list[float] = []
    counter = iter(range(runs)) if runs is not None else itertools.count()
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else math.inf

    async def lane() -> None:
        for n in counter:
            began = time.perf_counter()
            if began >= deadline:
                return
            await one(n)
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return _stats(latencies, time.perf_counter() - started)


async def in_process(
    root: Path, seconds: float, concurrency: int, executor: str = "worker"
) -> dict[str, float]:
    """The one-node workflow through WorkflowRuntime in this process for `seconds`, after
    a warm-up: the baseline of every service path."""
    settings = load_settings(
        CORRAL_STATE_DIR=str(root / "inproc"), SANDBOX_MAX_MEMORY_MB="64",
        SANDBOX_EXECUTOR=executor,
    )  # fmt: skip
    framework = ConnectorFramework([root / "catalog"])
    async with WorkflowRuntime(settings, framework=framework) as runtime:

        async def one(n: int) -> None:
            run = await runtime.run_workflow(WORKFLOW, input={"n": n}, run_id=uuid.uuid4().hex)
            assert run.status == "succeeded", run.to_dict()

        await _closed_loop(one, concurrency, runs=WARM_RUNS)
        return await _closed_loop(one, concurrency, seconds=seconds)


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


async def through_service(
    url: str, runs: int, concurrency: int, *, one_request: bool = True
) -> dict[str, float]:
    """Runs started through the API; with `one_request`, each is one POST ?wait_s= (which
    answers with the finished run), else a POST and then a GET ?wait_s=."""
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
            body = {"input": {"n": n}}
            params = WAIT if one_request else {}
            async with client.post("/api/workflows/bench/runs", json=body, params=params) as answer:
                started = await answer.json()
            run, run_id = started.get("run"), started["run_id"]
            while run is None or run["status"] not in ("succeeded", "failed", "cancelled"):
                # the API answers once the run has finished (or after WAIT_S)
                async with client.get(f"/api/runs/{run_id}", params=WAIT) as answer:
                    run = await answer.json()
            assert run["status"] == "succeeded", run

        await _closed_loop(one, concurrency, runs=WARM_RUNS)
        if not runs:  # made ready and warm only (through_wrk)
            return {}
        return await _closed_loop(one, concurrency, runs=runs)


def through_wrk(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    """`through_service`'s one-request runs for `seconds`, sent by wrk (bench/service.lua):
    a load generator in C, which leaves the service the CPU that aiohttp takes from it."""
    asyncio.run(through_service(url, 0, concurrency))  # ready, the workflow stored, warm
    command = [
        "wrk", "--threads", "1", "--connections", str(concurrency),
        "--duration", f"{seconds:g}s", "--timeout", "35s",
        "--script", str(Path(__file__).with_name("service.lua")),
        f"{url}/api/workflows/bench/runs?wait_s={WAIT['wait_s']}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    try:
        summary = json.loads(lines[-1])
    except ValueError:
        raise RuntimeError(f"wrk printed no summary (bench/service.lua): {lines[-1]!r}") from None
    if summary["failed"] or summary["errors"] or not summary["answered"]:
        raise RuntimeError(f"wrk: not every run succeeded: {summary}")
    return {
        "runs_per_s": round(summary["answered"] / (summary["elapsed_us"] / 1e6), 1),
        "p50_ms": round(summary["p50_us"] / 1000, 2),
        "p95_ms": round(summary["p95_us"] / 1000, 2),
    }


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


def _median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """The round whose runs per second is the median of `rows`."""
    return sorted(rows, key=lambda row: row["runs_per_s"])[len(rows) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=400,
        help="runs a round of each service path that aiohttp drives (default: 400)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=2.0,
        help="how long a round runs in-process, and of each path that wrk drives (default: 2)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds, the paths interleaved (default: 5)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--executor", choices=("worker", "process"), default="worker",
        help="the sandbox backend of every path (default: worker, the targets' backend)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {"in-process": []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, contextlib.ExitStack() as up:
        root = Path(tmp)
        _catalog(root)
        base = {name: value for name, value in os.environ.items()
                if not name.startswith(("CORRAL_", "SANDBOX_", "ENABLE_INLINE"))}  # fmt: skip
        base.update({"CORRAL_CONNECTORS_DIR": str(root / "catalog"), "CORRAL_API_PORT": "0",
                     "SANDBOX_MAX_MEMORY_MB": "64", "SANDBOX_EXECUTOR": args.executor})  # fmt: skip
        urls = {"embedded": up.enter_context(
            _processes({**base, "CORRAL_STATE_DIR": str(root / "embedded")}, args.concurrency)
        )}  # fmt: skip
        redis_url = up.enter_context(_redis(root))
        if redis_url is not None:
            env = {**base, "CORRAL_STATE_DIR": str(root / "redis"), "CORRAL_REDIS_URL": redis_url}
            urls["redis"] = up.enter_context(_processes(env, args.concurrency))
        wrk = shutil.which("wrk") is not None
        paths = {name: (url, True) for name, url in urls.items()}
        paths[TWO_REQUESTS] = (urls["embedded"], False)
        for round_ in range(1, args.rounds + 1):  # interleaved: drift hits every path alike
            print(f"round {round_}/{args.rounds}: in-process", end="", file=sys.stderr, flush=True)
            samples["in-process"].append(asyncio.run(
                in_process(root, args.seconds, args.concurrency, args.executor)
            ))  # fmt: skip
            for name, (url, one_request) in paths.items():
                print(f", {name}", end="", file=sys.stderr, flush=True)
                if one_request and wrk:
                    sample = through_wrk(url, args.seconds, args.concurrency)
                else:
                    sample = asyncio.run(through_service(
                        url, args.runs, args.concurrency, one_request=one_request
                    ))  # fmt: skip
                samples.setdefault(name, []).append(sample)
            print(file=sys.stderr)
    results = {name: dict(_median_row(rows)) for name, rows in samples.items()}
    for name in paths:  # each round's ratio, against the in-process figure of the same round
        rounds = zip(samples["in-process"], samples[name], strict=True)
        ratios = [inproc["runs_per_s"] / row["runs_per_s"] for inproc, row in rounds]
        cost = statistics.median(ratios)
        results[name]["cost_x"] = round(cost, 2)
        results[name]["cost_x_rounds"] = [round(ratio, 2) for ratio in ratios]
        results[name]["overhead_x"] = round(cost - 1, 2)
    if args.json:
        print(json.dumps({"concurrency": args.concurrency, "runs": args.runs,
                          "seconds": args.seconds,
                          "client": "wrk" if wrk else "aiohttp",
                          "rounds": args.rounds, **results}))  # fmt: skip
        return 0
    driven = (
        f"the service paths driven {args.seconds:g} s each by wrk, {TWO_REQUESTS} by aiohttp"
        if wrk else "every service path driven by aiohttp (apt-get install wrk: a load "
        "generator that takes less of the machine's CPU from the service)"
    )  # fmt: skip
    print(f"one-node runs, {args.concurrency} in flight, {args.executor} executor, "
          f"in-process {args.seconds:g} s a round; {driven}; medians of {args.rounds} "
          "interleaved rounds (cost x: the median round's, then the lowest and highest)"
          )  # fmt: skip
    print(f"{'path':<22}{'runs/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'cost x':>10}"
          f"{'rounds':>12}{'overhead x':>12}  verdict")  # fmt: skip
    met = True
    for name, row in results.items():
        cost = row.get("cost_x", 1.0)
        spread = row.get("cost_x_rounds")
        overhead = row.get("overhead_x", 0.0)
        verdict = ""
        if name == TWO_REQUESTS:
            verdict = "info"
        elif name != "in-process":
            passed = overhead <= TARGET_OVERHEAD and row["runs_per_s"] > N8N_RUNS_PER_S
            met = met and passed
            verdict = "PASS" if passed else "FAIL"
        print(f"{name:<22}{row['runs_per_s']:>10}{row['p50_ms']:>10}{row['p95_ms']:>10}"
              f"{cost:>10.2f}{f'{min(spread):.2f}-{max(spread):.2f}' if spread else '':>12}"
              f"{overhead:>12.2f}  {verdict}")  # fmt: skip
    print(f"targets: overhead (cost x - 1) at most {TARGET_OVERHEAD}x the in-process cost; "
          f"more than {N8N_RUNS_PER_S:.0f} runs/s (n8n, one instance)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
