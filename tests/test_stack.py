"""`corral stack` as a real process on the embedded default: ready only once its api,
worker and scheduler answer; a run end to end through the API; a killed child restarted;
SIGTERM stops everything and leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from conftest import serving
from test_api import CONNECTOR, HANDLERS, TOKEN, _Service

READY_PATIENCE_S = 60.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("queue", ["sqlite", "bullmq"])
def test_the_stack_runs_a_workflow_restarts_a_crashed_child_and_stops_cleanly(
    tmp_path: Path, queue: str, request: pytest.FixtureRequest
):
    """From nothing but a state dir (or a Redis): ready; a stored connection and workflow
    run and show in /metrics; a worker killed with SIGKILL is restarted (the stack says so);
    SIGTERM stops every child within the bound, exit 0, nothing left."""
    folder = tmp_path / "catalog" / "svc"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SANDBOX_", "CORRAL_", "ENABLE_INLINE"))}  # fmt: skip
    env.update({
        "CORRAL_STATE_DIR": str(tmp_path / "state"), "CORRAL_CONNECTORS_DIR": str(folder.parent),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1", "CORRAL_API_PORT": "0", "CORRAL_API_TOKEN": TOKEN,
        "CORRAL_WORKER_HEARTBEAT_S": "0.2", "CORRAL_LEASE_S": "2",
        "CORRAL_WORKER_GRACE_S": "2", "SANDBOX_EXECUTOR": "process",
        "SANDBOX_MAX_MEMORY_MB": "128",
    })  # fmt: skip
    if queue == "bullmq":
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/5"
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
        env["CORRAL_REDIS_URL"] = url
    lines: list[str] = []
    stack = subprocess.Popen(
        [sys.executable, "-m", "corral", "stack"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    reader = threading.Thread(target=lambda: lines.extend(stack.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    descendants: dict[int, psutil.Process] = {}  # kept as processes: a pid may be reused
    try:
        ready = _wait_line(lines, r"corral stack: ready: api (http://\S+),", READY_PATIENCE_S)
        url = ready.group(1)
        descendants.update((p.pid, p) for p in psutil.Process(stack.pid).children(recursive=True))
        with (
            serving(_Service) as service,
            httpx.Client(
                base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as client,
        ):
            service.hits = []  # type: ignore[attr-defined]
            service.release = threading.Event()  # type: ignore[attr-defined]
            base = f"http://127.0.0.1:{service.server_address[1]}"
            connection = {"baseUrl": base, "credentials": {"token": "t0ken-xyz"}}
            client.put("/api/connections/svc", json=connection)
            workflow = {"nodes": [{"id": "a", "app": "svc", "function": "call",
                                   "params": {"path": "ok/1"}}]}  # fmt: skip
            assert client.put("/api/workflows/wf", json=workflow).status_code == 200
            assert client.post("/api/workflows/wf/runs", json={"run_id": "r1"}).status_code == 202
            _wait(lambda: client.get("/api/runs/r1").json()["status"] == "succeeded", "run r1")
            metrics = client.get("/metrics").text
            assert 'corral_runs_total{status="succeeded",workflow="wf"} 1.0' in metrics
            worker = _wait(  # a beat is fresh for 0.6 s here: looked at until it is
                lambda: [w for w in client.get("/api/workers").json()["workers"] if w["fresh"]],
                "a fresh worker heartbeat",
            )
            assert len(worker) == 1
            os.kill(worker[0]["pid"], signal.SIGKILL)
            _wait_line(lines, r"\[?corral stack: worker exited with status -9; restarting", 30)
            _wait(
                lambda: any(w["fresh"] and w["pid"] != worker[0]["pid"]
                            for w in client.get("/api/workers").json()["workers"]),
                "a new worker's heartbeat",
            )  # fmt: skip
            assert client.post("/api/workflows/wf/runs", json={"run_id": "r2"}).status_code == 202
            _wait(lambda: client.get("/api/runs/r2").json()["status"] == "succeeded", "run r2")
            # The worker's counters are in the API's /metrics (one multiprocess directory),
            # the killed worker's too.
            metrics = client.get("/metrics").text
            executed = re.findall(
                r'^corral_sandbox_executions_total\{executor="\w+",outcome="ok"\} (\S+)$',
                metrics, re.M,
            )  # fmt: skip
            assert sum(float(value) for value in executed) == 2.0, metrics
            attempts = 'corral_node_attempts_total{connector="svc",function="call",outcome="ok"}'
            assert f"{attempts} 2.0" in metrics
        descendants.update((p.pid, p) for p in psutil.Process(stack.pid).children(recursive=True))
        started = time.monotonic()
        stack.send_signal(signal.SIGTERM)
        assert stack.wait(timeout=30) == 0, "".join(lines[-30:])
        assert time.monotonic() - started < 20
        reader.join(timeout=10)
        assert any("corral stack: stopped" in line for line in lines)
        left = [pid for pid, process in descendants.items() if _alive(process)]
        assert not left, f"processes left behind: {left}"
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
            for pid in descendants:
                with_suppressed_kill(pid)
            stack.wait()


def _alive(process: psutil.Process) -> bool:
    """Whether `process` (the very one, not a later one with its pid) runs, not a zombie."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def with_suppressed_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _wait_line(lines: list[str], pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            match = re.search(pattern, line)
            if match:
                return match
        time.sleep(0.05)
    raise AssertionError(f"no line like {pattern!r} within {timeout} s:\n{''.join(lines[-40:])}")


def _wait(check, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.mark.timeout(180)
def test_the_readmes_tour_starts_the_stack_and_runs_a_workflow_through_it(tmp_path: Path):
    """The README's first command, `python3 examples/service_tour.py`, as a person runs it
    (here with --exit, on a free port): it starts `corral stack` on the embedded default,
    stores the connections and the workflow, follows the run live (its retry too), finds it
    in /metrics, then stops the stack and leaves nothing behind."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SANDBOX_", "CORRAL_", "ENABLE_INLINE"))}  # fmt: skip
    env["CORRAL_STATE_DIR"] = str(tmp_path / "state")
    tour = Path(__file__).resolve().parents[1] / "examples" / "service_tour.py"
    process = subprocess.Popen(
        [sys.executable, str(tour), "--exit", "--port", "0"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 0, output
    assert re.search(r"node\.retry +\{\"node\": \"notify\"", output), output
    assert re.search(r"run \w+: succeeded", output), output
    assert 'corral_runs_total{status="succeeded",workflow="triage"} 1.0' in output, output
    assert (
        'corral_node_attempts_total{connector="slack",function="post_message",outcome="ok"}'
        in output
    )
    assert "ghp_example_1234" not in output
    assert not _processes_with(env["CORRAL_STATE_DIR"]), "the stack left processes behind"


def _processes_with(state_dir: str) -> list[int]:
    """Processes whose environment names `state_dir` (a stack's children, their sandboxes)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("CORRAL_STATE_DIR") == state_dir:
                found.append(process.pid)
    return found
