"""`corral worker` as real processes: runs leased off the queue (embedded SQLite, and
BullMQ on conftest's redis-server), executed in real sandboxes against a real HTTP server
on 127.0.0.1; killed with SIGKILL, stopped with SIGTERM, cancelled mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from conftest import free_port, private_redis, send_json, serving
from test_queue import put_raw_job

from corral.config import load_settings
from corral.service._runs import cancel_run, retry_run, submit_run
from corral.service.queue import open_queue
from corral.service.records import new_run, open_records

CONNECTOR = {
    "id": "probe",
    "name": "Probe",
    "actions": [{"id": "call", "method": "GET", "endpoint": "/", "fallback": None,
                 "params": {"type": "object", "required": ["url"],
                            "properties": {"url": {"type": "string"}}}}],
}  # fmt: skip

HANDLERS = """
def call(params, context):
    log("calling", params["url"])
    response = http.get(params["url"], timeout=60)
    response.raise_for_status()
    return response.json()
"""

PATIENCE_S = 30.0


class _Service(http.server.BaseHTTPRequestHandler):
    """/fast/*: answers at once. /block/*: holds every request until `release` is set.
    Every hit is recorded; `.hits` counts them by path."""

    def do_GET(self) -> None:
        server = self.server
        path = self.path.lstrip("/")
        with server.lock:  # type: ignore[attr-defined]
            server.hits[path] = server.hits.get(path, 0) + 1  # type: ignore[attr-defined]
            count = server.hits[path]  # type: ignore[attr-defined]
        if path.startswith("block/"):
            server.release.wait(PATIENCE_S)  # type: ignore[attr-defined]
        send_json(self, {"path": path, "hit": count})  # the worker may be gone: no error

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[http.server.ThreadingHTTPServer]:
    """The HTTP server the runs call; `.release` lets blocked requests go."""
    with serving(_Service) as server:
        server.hits = {}  # type: ignore[attr-defined]
        server.lock = threading.Lock()  # type: ignore[attr-defined]
        server.release = threading.Event()  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            server.release.set()  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "bullmq"])
def env(request: pytest.FixtureRequest, tmp_path: Path, clean_env) -> dict[str, str]:
    """The service's environment: a catalog with the `probe` app, short leases, and the
    embedded queue in a fresh state dir, or BullMQ on a freshly flushed Redis database."""
    folder = tmp_path / "catalog" / "probe"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    values = {
        "CORRAL_CONNECTORS_DIR": str(folder.parent),
        "CORRAL_STATE_DIR": str(tmp_path / "state"),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1",
        "CORRAL_LEASE_S": "3",
        "CORRAL_WORKER_HEARTBEAT_S": "0.2",
        "CORRAL_RETRY_MAX_ATTEMPTS": "1",
        "SANDBOX_EXECUTOR": "process",
    }
    if request.param == "bullmq":
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/3"
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
        values["CORRAL_REDIS_URL"] = url
    for name, value in values.items():
        clean_env.setenv(name, value)
    return values


@pytest.fixture
def workers() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts `corral worker` processes (each its own session); kills what is left."""
    started: list[subprocess.Popen[str]] = []

    def start(_command: str = "worker", **extra: str) -> subprocess.Popen[str]:
        # A file, not a pipe: a pipe nobody reads would fill and block the process. Closed
        # at teardown.
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "corral", _command],
            env={**os.environ, **extra},
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        process.log = log  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        process.log.close()  # type: ignore[attr-defined]
    _no_processes_left(started)


def _no_processes_left(started: list[subprocess.Popen[str]]) -> None:
    """Nothing of the workers' sessions (sandbox zygotes, executions) outlives them."""
    deadline = time.monotonic() + 10
    sessions = {p.pid for p in started}
    while time.monotonic() < deadline:
        left = []
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):  # gone meanwhile
                if os.getsid(proc.pid) in sessions:
                    left.append(proc)
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes left behind: {left}")


def log_of(process: subprocess.Popen[str]) -> str:
    """What a process started by `workers` wrote on stderr so far."""
    process.log.seek(0)  # type: ignore[attr-defined]
    return process.log.read()  # type: ignore[attr-defined]


def workflow(service: http.server.ThreadingHTTPServer, *blocks: str) -> dict[str, Any]:
    """`first` calls /fast/first; then each of `blocks` (a chain) calls /block/<name>."""
    base = f"http://127.0.0.1:{service.server_address[1]}"
    nodes = [{"id": "first", "app": "probe", "function": "call",
              "params": {"url": f"{base}/fast/first"}}]  # fmt: skip
    for name in blocks:
        nodes.append({"id": name, "app": "probe", "function": "call",
                      "params": {"url": f"{base}/block/{name}"},
                      "dependsOn": [nodes[-1]["id"]]})  # fmt: skip
    return {"id": "wf", "nodes": nodes}


def act(operation: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """Run a run operation (submit, cancel, retry) against the deployment's queue."""

    async def go() -> Any:
        settings = load_settings()
        queue, records = open_queue(settings), open_records(settings)
        try:
            return await operation(records, queue, *args, **kwargs)
        finally:
            await queue.close()
            await records.close()

    return asyncio.run(go())


def read(what: str = "run", *args: Any) -> Any:
    """A run record (`read("run", id)`), a run's events (`read("events", id)`: their
    names and error types), the queue's counts, or the fresh workers."""

    async def go() -> Any:
        settings = load_settings()
        queue, records = open_queue(settings), open_records(settings)
        try:
            if what == "run":
                return await records.get_run(*args)
            if what == "events":
                events = await records.run_events(*args)
                return [(event["event"], event.get("error_type")) for _, event in events]
            if what == "counts":
                return await queue.counts()
            return await records.workers(seen_since=time.time() - 1)
        finally:
            await queue.close()
            await records.close()

    return asyncio.run(go())


def wait_for(check: Callable[[], Any], what: str, timeout: float = PATIENCE_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def submit(definition: dict[str, Any], run_id: str) -> str:
    return act(submit_run, definition, {}, run_id=run_id)


def test_a_killed_worker_s_run_is_resumed_by_another_and_nodes_do_not_run_twice(
    env, service, workers
):
    """SIGKILL mid-run: another worker takes the run back once the lease lapses; the node
    that had finished replays from the store, the interrupted one runs again."""
    first = workers()
    submit(workflow(service, "second"), "r-kill")
    wait_for(lambda: service.hits.get("block/second"), "the second node running")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    service.release.set()
    workers()
    record = wait_for(
        lambda: (r := read("run", "r-kill")) and r["status"] == "succeeded" and r,
        "the run finished by the second worker",
    )
    assert service.hits == {"fast/first": 1, "block/second": 2}
    assert record["attempts"] == 2
    assert record["nodes"]["first"]["metadata"]["replayed"] is True
    assert record["nodes"]["second"]["output"] == {"path": "block/second", "hit": 2}
    assert record["nodes"]["second"]["logs"][0]["message"].startswith("calling")
    assert record["nodes"]["second"]["usage"]["wall_ms"] > 0
    assert read("counts") == {"waiting": 0, "active": 0}


@pytest.mark.parametrize("concurrency", ["1", "4"])
def test_sigterm_hands_back_what_does_not_finish_within_the_grace_period(
    env, service, workers, concurrency
):
    """SIGTERM: the worker takes nothing more, waits CORRAL_WORKER_GRACE_S, then hands the
    unfinished run back (queued again, not counted as lost) and exits 0; also when every
    slot is busy (concurrency 1), where the claim loop waits for a slot, not for Redis."""
    worker = workers(CORRAL_WORKER_GRACE_S="0.5", CORRAL_WORKER_CONCURRENCY=concurrency)
    submit(workflow(service, "second"), "r-term")
    wait_for(lambda: service.hits.get("block/second"), "the second node running")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, log_of(worker)
    assert time.monotonic() - started < 10
    record = read("run", "r-term")
    assert (record["status"], record["worker"]) == ("queued", None)
    assert read("counts") == {"waiting": 1, "active": 0}
    service.release.set()
    workers()
    record = wait_for(
        lambda: (r := read("run", "r-term")) and r["status"] == "succeeded" and r,
        "the handed-back run finished",
    )
    assert record["attempts"] == 2 and service.hits["fast/first"] == 1


def test_sigterm_lets_a_run_finish_within_the_grace_period(env, service, workers):
    """A run that finishes within the grace period after SIGTERM is recorded succeeded."""
    worker = workers(CORRAL_WORKER_GRACE_S="20")
    submit(workflow(service, "second"), "r-grace")
    wait_for(lambda: service.hits.get("block/second"), "the second node running")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.poll() is None, "the worker waits for its run"
    service.release.set()
    assert worker.wait(timeout=20) == 0
    assert read("run", "r-grace")["status"] == "succeeded"


def test_a_worker_runs_concurrency_runs_at_once_and_says_so(env, service, workers):
    """CORRAL_WORKER_CONCURRENCY=2: two of three runs start, the heartbeat shows 2 running;
    all three finish once released."""
    workers(CORRAL_WORKER_CONCURRENCY="2")
    for n in range(3):
        submit(workflow(service, f"b{n}"), f"r-{n}")
    wait_for(lambda: sum(service.hits.get(f"block/b{n}", 0) for n in range(3)) == 2, "two running")
    beat = wait_for(lambda: [w for w in read("workers") if w["running"] == 2], "a heartbeat")
    assert beat[0]["pid"] > 0 and beat[0]["host"]
    time.sleep(0.5)
    assert sum(service.hits.get(f"block/b{n}", 0) for n in range(3)) == 2
    assert read("counts") == {"waiting": 1, "active": 2}
    service.release.set()
    for n in range(3):
        wait_for(lambda n=n: read("run", f"r-{n}")["status"] == "succeeded", f"run {n}")


def test_a_cancelled_run_stops_and_a_retry_resumes_it(env, service, workers):
    """Cancel kills the running node (its request is dropped); retry re-runs the same run
    id: the finished node replays, the cancelled one runs again."""
    workers()
    submit(workflow(service, "second"), "r-cancel")
    wait_for(lambda: service.hits.get("block/second"), "the second node running")
    act(cancel_run, "r-cancel")
    record = wait_for(
        lambda: (r := read("run", "r-cancel"))["status"] == "cancelled" and r, "cancelled"
    )
    assert record["error"]["type"] == "cancelled"
    service.release.set()
    act(retry_run, "r-cancel")
    record = wait_for(
        lambda: (r := read("run", "r-cancel"))["status"] == "succeeded" and r, "resumed"
    )
    assert service.hits == {"fast/first": 1, "block/second": 2}
    assert record["nodes"]["first"]["metadata"]["replayed"] is True


def test_a_queued_run_is_cancelled_before_it_starts(env, service, workers):
    """Cancelling a run no worker holds yet removes it from the queue at once."""
    submit(workflow(service), "r-early")
    act(cancel_run, "r-early")
    assert read("run", "r-early")["status"] == "cancelled"
    assert read("counts") == {"waiting": 0, "active": 0}


def test_a_run_whose_workers_keep_dying_fails_as_worker_lost(env, service, workers):
    """CORRAL_MAX_RECLAIMS=0: once its worker is killed, the next worker fails the run as
    worker_lost instead of running it again."""
    first = workers(CORRAL_MAX_RECLAIMS="0")
    submit(workflow(service, "second"), "r-lost")
    wait_for(lambda: service.hits.get("block/second"), "the second node running")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    workers(CORRAL_MAX_RECLAIMS="0")
    record = wait_for(
        lambda: (r := read("run", "r-lost"))["status"] == "failed" and r, "failed as lost"
    )
    assert record["error"]["type"] == "worker_lost"
    assert "CORRAL_MAX_RECLAIMS=0" in record["error"]["message"]
    assert service.hits["block/second"] == 1
    assert read("counts") == {"waiting": 0, "active": 0}


def test_a_job_without_a_record_runs_its_stored_workflow(env, service, workers):
    """A job enqueued by another producer (`{"workflow", "input"}`, no run record) runs the
    stored workflow; one naming no stored workflow fails as invalid_input."""

    async def produce(records: Any, queue: Any) -> None:
        await records.put_workflow(workflow(service), time.time())
        await queue.enqueue("from-elsewhere", {"workflow": "wf", "input": {}})
        await queue.enqueue("unknown-workflow", {"workflow": "nope"})

    act(produce)
    workers()
    done = wait_for(
        lambda: (r := read("run", "from-elsewhere")) and r["status"] == "succeeded" and r,
        "the produced run finished",
    )
    assert done["workflow"] == "wf" and done["nodes"]["first"]["status"] == "succeeded"
    failed = wait_for(lambda: read("run", "unknown-workflow"), "the bad job recorded")
    assert (failed["status"], failed["error"]["type"]) == ("failed", "invalid_input")
    assert "'nope'" in failed["error"]["message"]
    assert read("events", "unknown-workflow") == [("run.finished", "invalid_input")]


def test_a_job_with_unusable_data_fails_its_run_once_and_the_worker_goes_on(env, service, workers):
    """A job whose data is not JSON (its run recorded), and one whose data is not an object
    (no record): each run fails once as invalid_input, and the worker goes on to run the
    next one at once, without backing off."""

    async def produce(records: Any, queue: Any) -> None:
        await records.create_run(new_run("bad-json", workflow(service), {}, time.time()))
        where = env.get("CORRAL_REDIS_URL") or Path(env["CORRAL_STATE_DIR"]) / "queue.db"
        await put_raw_job(where, "bad-json", "{oops")
        await put_raw_job(where, "bad-shape", "[]")
        await submit_run(records, queue, workflow(service), {}, run_id="good")

    act(produce)
    worker = workers()
    wait_for(lambda: "at a time from the" in log_of(worker), "the worker serving")
    started = time.monotonic()  # from here, not its start-up (slow on a loaded machine)
    wait_for(lambda: (r := read("run", "good")) and r["status"] == "succeeded", "good finished")
    assert time.monotonic() - started < 10, "the worker stalled on the bad jobs"
    for run_id, says in (("bad-json", "not valid JSON"), ("bad-shape", "JSON object")):
        record = read("run", run_id)
        assert (record["status"], record["error"]["type"]) == ("failed", "invalid_input")
        assert says in record["error"]["message"]
        assert read("events", run_id) == [("run.finished", "invalid_input")]
    assert read("counts") == {"waiting": 0, "active": 0}
    assert log_of(worker).count("failed: the job's data") == 2
    assert "Traceback" not in log_of(worker)


def test_a_standalone_worker_serves_metrics_counting_every_sandbox_execution(env, service, workers):
    """`corral worker` with CORRAL_WORKER_METRICS_PORT=0 serves /metrics on 127.0.0.1 (the
    port in its log); every node it runs is a sandbox execution by executor and outcome,
    and the runs' durations are there; no run id is."""
    # A long lease: on a loaded machine the short one may lapse and the run (rightly) run twice.
    worker = workers(CORRAL_WORKER_METRICS_PORT="0", CORRAL_LEASE_S="30")
    url = wait_for(
        lambda: re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log_of(worker)),
        "the metrics address logged",
    ).group(1)
    base = f"http://127.0.0.1:{service.server_address[1]}"
    failing = {"id": "wf-bad", "nodes": [{"id": "down", "app": "probe", "function": "call",
               "params": {"url": f"http://127.0.0.1:{free_port()}/"}}]}  # fmt: skip
    submit(workflow(service), "metered-ok")
    submit(failing, "metered-bad")
    for run_id, status in (("metered-ok", "succeeded"), ("metered-bad", "failed")):
        wait_for(lambda r=run_id, s=status: read("run", r)["status"] == s, f"{run_id} {status}")
    text = httpx.get(url, timeout=10).text
    samples = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith("corral_sandbox_executions_total{")
    )
    assert samples.pop('corral_sandbox_executions_total{executor="process",outcome="ok"}') == "1.0"
    assert [float(v) for v in samples.values()] == [1.0], samples  # the failed node's outcome
    assert "corral_run_duration_seconds_count 2.0" in text
    assert "metered-ok" not in text and base not in text


def test_a_bad_metrics_port_is_one_clear_error(env, workers):
    """--metrics-port or CORRAL_WORKER_METRICS_PORT out of range: exit 2, one line naming
    them; a port already taken: the same, naming the address."""
    bad = workers(CORRAL_WORKER_METRICS_PORT="70000")
    assert bad.wait(timeout=30) == 2
    assert "CORRAL_WORKER_METRICS_PORT='70000' is invalid: above 65535" in log_of(bad)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = workers(CORRAL_WORKER_METRICS_PORT=str(taken.getsockname()[1]))
        assert busy.wait(timeout=30) == 2
    assert "cannot serve the worker's metrics on 127.0.0.1:" in log_of(busy)
    assert "Traceback" not in log_of(bad) + log_of(busy)


def _on_a_private_redis(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, *, lease_s: str
) -> tuple[Path, int]:
    """The environment of workers on a Redis of the test's own (not started yet), with the
    `probe` app: the Redis's data directory and port."""
    folder = tmp_path / "catalog" / "probe"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    port = free_port()
    for name, value in {
        "CORRAL_CONNECTORS_DIR": str(folder.parent), "CORRAL_STATE_DIR": str(tmp_path / "s"),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1", "CORRAL_LEASE_S": lease_s,
        "CORRAL_REDIS_URL": f"redis://127.0.0.1:{port}/0", "SANDBOX_EXECUTOR": "process",
    }.items():  # fmt: skip
        clean_env.setenv(name, value)
    data = tmp_path / "redis"
    data.mkdir()
    return data, port


def test_workers_ride_out_a_redis_restart_and_no_run_is_lost(tmp_path, service, workers, clean_env):
    """Redis goes away: the worker keeps retrying (it does not exit); a run queued before
    the outage and one queued after it both finish once Redis is back."""
    data, port = _on_a_private_redis(tmp_path, clean_env, lease_s="3")
    with private_redis(data, port):
        submit(workflow(service), "before")
    worker = workers()
    wait_for(lambda: "again in" in log_of(worker), "the worker retrying without Redis")
    assert worker.poll() is None
    with private_redis(data, port):
        wait_for(lambda: read("run", "before")["status"] == "succeeded", "the queued run")
        submit(workflow(service), "after")
        wait_for(lambda: read("run", "after")["status"] == "succeeded", "the later run")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
    assert "again in" in log_of(worker)


def test_a_run_keeps_its_lease_through_a_redis_restart(tmp_path, service, workers, clean_env):
    """Redis restarts while a run runs: its keeper rides out the outage and renews the lease
    once Redis is back, rather than stopping and letting the lease lapse (the run would be
    taken back and run again): one attempt, its blocking node called once."""
    data, port = _on_a_private_redis(tmp_path, clean_env, lease_s="6")
    with private_redis(data, port):
        worker = workers()
        submit(workflow(service, "kept"), "kept")
        wait_for(lambda: service.hits.get("block/kept", 0) == 1, "the run's blocking node")
    time.sleep(1.5)  # Redis is down: the keeper, woken by its lost subscription, fails
    with private_redis(data, port):
        # An unkept lease lapses within 6 s and is taken back by the next stalled-job check
        # (every 3 s); the node's time-out (15 s) is still far.
        time.sleep(9)
        service.release.set()
        wait_for(lambda: read("run", "kept")["status"] == "succeeded", "the run")
        assert read("run", "kept")["attempts"] == 1
        assert service.hits["block/kept"] == 1
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
    assert "run kept: Redis at" in log_of(worker)


def test_a_worker_stops_in_bounded_time_while_redis_does_not_answer(tmp_path, workers, clean_env):
    """SIGTERM while Redis holds its connections but answers nothing (SIGSTOP; its calls
    have no time-out of their own): the worker does not wait for it forever; it is cancelled
    CORRAL_WORKER_GRACE_S + 6 s after the signal, says so, exits 1, and leaves no process."""
    port = free_port()
    for name, value in {
        "CORRAL_STATE_DIR": str(tmp_path / "s"), "CORRAL_WORKER_GRACE_S": "1",
        "CORRAL_REDIS_URL": f"redis://127.0.0.1:{port}/0", "SANDBOX_EXECUTOR": "process",
    }.items():  # fmt: skip
        clean_env.setenv(name, value)
    data = tmp_path / "redis"
    data.mkdir()
    with private_redis(data, port) as server:
        worker = workers()
        wait_for(lambda: "from the bullmq queue" in log_of(worker), "the worker")
        family = psutil.Process(worker.pid).children(recursive=True)
        server.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)  # its claim waits on Redis now
            began = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=30)
            took = time.monotonic() - began
        finally:
            server.send_signal(signal.SIGCONT)
    assert code == 1, log_of(worker)
    assert 7 <= took < 7 + 3 + 3, took  # the grace, 6 s, then 3 s for its clean-up
    assert "still stopping 7 s after being asked" in log_of(worker)
    wait_for(lambda: not any(p.is_running() for p in family), "the worker's children gone")


def test_three_workers_share_the_load_and_survive_losing_one(env, service, workers):
    """Three workers, one run each at a time: three runs go to three workers; one worker
    killed mid-run, its run is finished by another, every run once."""
    pool = [workers(CORRAL_WORKER_CONCURRENCY="1") for _ in range(3)]
    for n in range(3):
        submit(workflow(service, f"s{n}"), f"shared-{n}")
    wait_for(lambda: sum(service.hits.get(f"block/s{n}", 0) for n in range(3)) == 3,
             "three runs running at once")  # fmt: skip
    holders = {read("run", f"shared-{n}")["worker"] for n in range(3)}
    assert len(holders) == 3, "each worker holds one run"
    victim = pool[0]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    service.release.set()
    for n in range(3):
        wait_for(lambda n=n: read("run", f"shared-{n}")["status"] == "succeeded", f"run {n}")
    lost = [n for n in range(3) if read("run", f"shared-{n}")["attempts"] == 2]
    assert len(lost) == 1, "only the killed worker's run ran again"
    assert service.hits["fast/first"] == 3
