"""`corral scheduler`: timers and triggers of stored workflows, as real scheduler and
worker processes over the embedded queue and store; two schedulers at once; restarts."""

from __future__ import annotations

import asyncio
import http.server
import json
import signal
import threading
import time
import zoneinfo
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import send_json, serving
from test_worker import act, log_of, wait_for, workers  # noqa: F401 (`workers` is a fixture)

from corral.config import load_settings
from corral.runtime import WorkflowRuntime, open_store
from corral.service._keys import load_key_ring
from corral.service._scheduler import (
    ScheduleError,
    Scheduler,
    check_schedule,
    item_run_id,
    occurrences,
)
from corral.service.records import new_run

TRIGGER_CONNECTOR = {
    "id": "feed",
    "name": "Feed",
    "actions": [{"id": "call", "method": "GET", "endpoint": "/", "fallback": None,
                 "params": {"type": "object", "required": ["url"],
                            "properties": {"url": {"type": "string"}}}}],
    "triggers": [{"id": "items", "method": "GET", "endpoint": "/items", "fallback": None,
                  "params": {"type": "object", "required": ["url"],
                             "properties": {"url": {"type": "string"}}},
                  "dedupe": {"strategy": "cursor", "cursor": "$.n", "key": "$.id"}}],
}  # fmt: skip

HANDLERS = """
def call(params, context):
    response = http.get(params["url"], timeout=60)
    response.raise_for_status()
    return response.json()


def items(params, context):
    response = http.get(params["url"], timeout=60)
    response.raise_for_status()
    return response.json()
"""


def test_interval_and_cron_occurrences():
    """Interval occurrences are aligned multiples; a cron follows its time zone."""
    assert occurrences({"interval_s": 10}, 100.0, 135.0) == [110.0, 120.0, 130.0]
    assert occurrences({"interval_s": 10}, 100.0, 105.0) == []
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    start = datetime(2026, 3, 1, 8, 30, tzinfo=paris).timestamp()
    daily = occurrences({"cron": "0 9 * * *", "timezone": "Europe/Paris"}, start, start + 2 * 86400)
    assert [datetime.fromtimestamp(t, paris).hour for t in daily] == [9, 9]


@pytest.mark.parametrize(
    "schedule",
    [{"interval_s": 0}, {"cron": "not cron"}, {"cron": "* * * * *", "timezone": "Mars/Base"}, 5],
)
def test_bad_schedules_are_refused(schedule: Any):
    """A schedule the scheduler could not fire is refused with what is wrong."""
    with pytest.raises(ScheduleError, match="schedule"):
        check_schedule(schedule)


class _Feed(http.server.BaseHTTPRequestHandler):
    """/items: the feed's current items. /run/*: a node's call, recorded; /block/* holds."""

    def do_GET(self) -> None:
        server = self.server
        path = self.path.lstrip("/")
        server.hits.append(path)  # type: ignore[attr-defined]
        if path.startswith("block/"):
            server.release.wait(30)  # type: ignore[attr-defined]
        send_json(self, server.items if path == "items" else {"ok": path})  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def feed() -> Iterator[http.server.ThreadingHTTPServer]:
    """The feed a trigger polls and the runs call; `.items` is what /items lists."""
    with serving(_Feed) as server:
        server.items = [{"id": "a", "n": 1}]  # type: ignore[attr-defined]
        server.hits = []  # type: ignore[attr-defined]
        server.release = threading.Event()  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            server.release.set()  # type: ignore[attr-defined]


@pytest.fixture
def env(tmp_path: Path, clean_env) -> dict[str, str]:
    """A catalog with the `feed` app; short leases; the embedded queue and store."""
    folder = tmp_path / "catalog" / "feed"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(TRIGGER_CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    values = {
        "CORRAL_CONNECTORS_DIR": str(folder.parent), "CORRAL_STATE_DIR": str(tmp_path / "s"),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1", "CORRAL_LEASE_S": "3",
        "CORRAL_WORKER_HEARTBEAT_S": "0.2", "SANDBOX_EXECUTOR": "process",
    }  # fmt: skip
    for name, value in values.items():
        clean_env.setenv(name, value)
    return values


def _store_workflow(definition: dict[str, Any]) -> None:
    async def put(records: Any, queue: Any) -> None:
        await records.put_workflow(definition, time.time())

    act(put)


def _runs(workflow: str) -> list[dict[str, Any]]:
    async def listed(records: Any, queue: Any) -> list[dict[str, Any]]:
        found, _ = await records.list_runs(workflow=workflow, limit=500)
        read = [await records.get_run(summary["id"]) for summary in found]
        return [run for run in read if run is not None]  # None: removed since it was listed

    return act(listed)


def _base(feed: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{feed.server_address[1]}"


def test_two_schedulers_fire_each_occurrence_once(env, feed, workers):
    """An interval timer with two schedulers running: every occurrence runs once, never
    twice; the runs carry their scheduled time."""
    _store_workflow({
        "id": "tick", "schedule": {"interval_s": 1},
        "nodes": [{"id": "a", "app": "feed", "function": "call",
                   "params": {"url": f"{_base(feed)}/run/tick"}}],
    })  # fmt: skip
    schedulers = [_scheduler(workers) for _ in range(2)]
    workers()
    wait_for(lambda: len([r for r in _runs("tick") if r["status"] == "succeeded"]) >= 4,
             "four occurrences run")  # fmt: skip
    for process in schedulers:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    runs = _runs("tick")
    times = [run["input"]["scheduled_at"] for run in runs]
    assert len(times) == len(set(times)), "an occurrence fired twice"
    assert all(t == int(t) for t in times)


def test_an_occurrence_is_skipped_while_the_previous_run_still_runs(env, feed, workers):
    """Occurrences that find the previous scheduled run still running do not queue runs."""
    _store_workflow({
        "id": "slow", "schedule": {"interval_s": 1},
        "nodes": [{"id": "a", "app": "feed", "function": "call",
                   "params": {"url": f"{_base(feed)}/block/slow"}}],
    })  # fmt: skip
    _scheduler(workers)
    workers()
    wait_for(lambda: "block/slow" in feed.hits, "the first run running")
    time.sleep(3)
    assert len(_runs("slow")) == 1
    feed.release.set()


def test_a_trigger_queues_one_run_per_new_item_across_restarts(env, feed, workers):
    """The first poll is a baseline; each new item then runs once, with the item as input,
    also when the scheduler is killed and restarted."""
    _store_workflow({
        "id": "fed", "trigger": {"app": "feed", "trigger": "items", "interval_s": 0.2,
                                 "params": {"url": f"{_base(feed)}/items"}},
        "nodes": [{"id": "a", "app": "feed", "function": "call",
                   "params": {"url": f"{_base(feed)}/run/{{{{ input.key }}}}"}}],
    })  # fmt: skip
    first = _scheduler(workers)
    workers()
    wait_for(lambda: feed.hits.count("items") >= 2, "a baseline and a poll")
    assert _runs("fed") == []
    feed.items = [{"id": "a", "n": 1}, {"id": "b", "n": 2}]
    run = wait_for(lambda: [r for r in _runs("fed") if r["status"] == "succeeded"], "item b")
    assert run[0]["id"] == item_run_id("fed", "b") and run[0]["input"]["item"]["id"] == "b"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    feed.items = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 3}]
    _scheduler(workers)
    wait_for(lambda: len([r for r in _runs("fed") if r["status"] == "succeeded"]) == 2, "c")
    time.sleep(1)
    assert sorted(r["input"]["key"] for r in _runs("fed")) == ["b", "c"]
    assert feed.hits.count("run/b") == 1 and feed.hits.count("run/c") == 1


def _scheduler(workers: Any, **extra: str) -> Any:
    """A `corral scheduler` process, through test_worker's fixture (killed at the end)."""
    return workers(_command="scheduler", **extra)


def test_a_tick_ends_between_workflows_once_the_stop_is_set(env):
    """A stop set during a tick ends it before the next workflow (a trigger's poll may take
    a node's time-out, and a stopping process has a bound): nothing more is looked at; the
    next tick without a stop looks at every workflow (a schedule's first look keeps its
    baseline in the store)."""
    every = {"interval_s": 60}
    for workflow_id in ("first", "second"):
        nodes = [{"id": "n", "app": "feed", "function": "call", "params": {}}]
        _store_workflow({"id": workflow_id, "nodes": nodes, "schedule": every})

    async def ticks(records: Any, queue: Any) -> list[list[bool]]:
        settings = load_settings()
        store = open_store(settings)
        async with WorkflowRuntime(settings, store=store) as runtime:
            scheduler = Scheduler(records, queue, store, runtime, load_key_ring(settings),
                                  lease_s=30, catchup_s=3600)  # fmt: skip

            async def looked() -> list[bool]:
                keys = ("schedule:first", "schedule:second")
                return [await store.get_json(key) is not None for key in keys]

            stop = asyncio.Event()
            stop.set()
            await scheduler.tick(stop)
            stopped = await looked()
            await scheduler.tick()
            return [stopped, await looked()]

    assert act(ticks) == [[False, False], [True, True]]


def test_the_scheduler_removes_runs_finished_past_their_retention(env, workers):
    """CORRAL_RUN_RETENTION_DAYS=30: the leading scheduler removes runs that finished more
    than 30 days ago, with their events; runs queued or running stay however old, and so
    do recent ones. A bad value is one clear error."""
    day = 86_400.0
    now = time.time()

    async def seed(records: Any, queue: Any) -> None:
        for run_id, created, status in (
            ("old-ok", now - 60 * day, "succeeded"), ("old-failed", now - 40 * day, "failed"),
            ("old-running", now - 60 * day, "running"), ("old-queued", now - 50 * day, "queued"),
            ("recent", now - 10 * day, "succeeded"),
        ):  # fmt: skip
            await records.create_run(new_run(run_id, {"id": "kept", "nodes": []}, {}, created))
            await records.append_event(run_id, {"event": "run.started"})
            finished = created + 60 if status in ("succeeded", "failed") else None
            await records.update_run(
                run_id, lambda r, s=status, f=finished: {**r, "status": s, "finished_at": f}
            )

    act(seed)
    bad = _scheduler(workers, CORRAL_RUN_RETENTION_DAYS="a month")
    assert bad.wait(timeout=20) != 0
    assert "CORRAL_RUN_RETENTION_DAYS='a month' is invalid" in log_of(bad)
    scheduler = _scheduler(workers, CORRAL_RUN_RETENTION_DAYS="30")
    wait_for(lambda: {r["id"] for r in _runs("kept")} == {"old-running", "old-queued", "recent"},
             "the old finished runs removed")  # fmt: skip

    async def events(records: Any, queue: Any) -> dict[str, int]:
        return {r: len(await records.run_events(r)) for r in ("old-ok", "old-failed", "recent")}

    assert act(events) == {"old-ok": 0, "old-failed": 0, "recent": 1}
    # Logged once the removal is written (which the test may see first).
    wait_for(lambda: "removed 2 run(s) finished over 30 days" in log_of(scheduler), "its log line")
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(timeout=20) == 0
