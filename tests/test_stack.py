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
    descendants: set[int] = set()
    try:
        ready = _wait_line(lines, r"corral stack: ready: api (http://\S+),", READY_PATIENCE_S)
        url = ready.group(1)
        descendants |= {p.pid for p in psutil.Process(stack.pid).children(recursive=True)}
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
            worker = [w for w in client.get("/api/workers").json()["workers"] if w["fresh"]]
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
        descendants |= {p.pid for p in psutil.Process(stack.pid).children(recursive=True)}
        started = time.monotonic()
        stack.send_signal(signal.SIGTERM)
        assert stack.wait(timeout=30) == 0, "".join(lines[-30:])
        assert time.monotonic() - started < 20
        reader.join(timeout=10)
        assert any("corral stack: stopped" in line for line in lines)
        left = [pid for pid in descendants if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
        assert not left, f"processes left behind: {left}"
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
            for pid in descendants:
                with_suppressed_kill(pid)
            stack.wait()


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


def _wait(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")
