"""Run records, stored workflows and worker heartbeats, one suite over SQLite (a temporary
state database) and Redis (conftest's real redis-server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from corral.config import load_settings
from corral.runtime import SqliteStore
from corral.service._changes import ANY, RING_RECORD_MAX, finished_ring
from corral.service.api._wait import RunWaiter
from corral.service.queue import SqliteQueue, open_queue
from corral.service.records import (
    Records,
    RecordsError,
    RedisRecords,
    SqliteRecords,
    new_run,
    open_records,
)

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
WORKFLOW = {"id": "triage", "nodes": [{"id": "a", "app": "svc", "function": "call"}]}

OpenRecords = Callable[[], Records]


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, as the service does."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
async def open_r(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenRecords]:
    """Opens handles on one fresh place (a SQLite file or a Redis prefix); closes them all."""
    opened: list[Records] = []
    prefix = f"test:{uuid.uuid4().hex}:"
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def open_one() -> Records:
        records: Records = (
            SqliteRecords(tmp_path / "corral.db")
            if request.param == "sqlite"
            else RedisRecords(url, prefix=prefix)
        )
        opened.append(records)
        return records

    yield open_one
    for records in opened:
        await records.close()


def run(run_id: str, at: float, workflow: str = "triage") -> dict[str, Any]:
    return new_run(run_id, {**WORKFLOW, "id": workflow}, {"n": 1}, at)


async def test_a_run_record_is_created_once_and_read_back(open_r: OpenRecords):
    """A run id is taken once; the record reads back as stored."""
    records = open_r()
    record = run("r1", T0)
    assert await records.create_run(record)
    assert not await records.create_run({**record, "input": {"other": True}})
    assert await records.get_run("r1") == record
    assert await records.get_run("nope") is None


async def test_updates_never_overwrite_each_other(open_r: OpenRecords):
    """Forty concurrent updates through two handles all land (optimistic versions)."""
    first, second = open_r(), open_r()
    await first.create_run(run("r1", T0))

    def add(n: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def change(record: dict[str, Any]) -> dict[str, Any]:
            return {**record, "nodes": {**record["nodes"], f"n{n}": {"status": "succeeded"}}}

        return change

    await asyncio.gather(
        *((first if n % 2 else second).update_run("r1", add(n)) for n in range(40))
    )
    record = await first.get_run("r1")
    assert record is not None and sorted(record["nodes"]) == sorted(f"n{n}" for n in range(40))


async def test_an_update_may_decline_and_a_missing_run_is_none(open_r: OpenRecords):
    """`change` returning None leaves the record; updating an unknown run returns None."""
    records = open_r()
    await records.create_run(run("r1", T0))
    assert await records.update_run("r1", lambda record: None) is None
    assert (await records.get_run("r1"))["status"] == "queued"  # type: ignore[index]
    assert await records.update_run("nope", lambda record: record) is None
    updated = await records.update_run("r1", lambda record: {**record, "status": "running"})
    assert updated is not None and updated["status"] == "running"
    assert (await records.get_run("r1"))["status"] == "running"  # type: ignore[index]


async def test_runs_list_newest_first_with_filters_and_a_cursor(open_r: OpenRecords):
    """Pages of a list cover every matching run once, newest first; status, workflow and
    since filter it."""
    records = open_r()
    for n in range(25):
        await records.create_run(run(f"r{n:02d}", T0 + n, "even" if n % 2 == 0 else "odd"))
    await records.update_run("r03", lambda record: {**record, "status": "failed"})
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await records.list_runs(limit=7, cursor=cursor)
        seen += [summary["id"] for summary in page]
        if cursor is None:
            break
    assert seen == [f"r{n:02d}" for n in reversed(range(25))]
    odd, _ = await records.list_runs(workflow="odd", limit=100)
    assert [s["id"] for s in odd] == [f"r{n:02d}" for n in reversed(range(1, 25, 2))]
    failed, more = await records.list_runs(status="failed")
    assert [(s["id"], s["status"]) for s in failed] == [("r03", "failed")] and more is None
    recent, _ = await records.list_runs(since=T0 + 20)
    assert [s["id"] for s in recent] == ["r24", "r23", "r22", "r21", "r20"]
    assert set(recent[0]) == {
        "id", "workflow", "status", "created_at", "started_at", "finished_at", "duration_s",
        "error_type",
    }  # fmt: skip
    with pytest.raises(ValueError, match="status must be one of"):
        await records.list_runs(status="bogus")
    with pytest.raises(ValueError, match="limit must be from 1"):
        await records.list_runs(limit=0)
    for since in (-1.0, float("inf"), float("nan"), 1e300):
        with pytest.raises(ValueError, match="since must be seconds since the epoch"):
            await records.list_runs(since=since)


async def test_workflows_are_stored_listed_and_removed(open_r: OpenRecords):
    """A stored workflow reads back, is listed by id with its time, and can be removed."""
    records = open_r()
    await records.put_workflow({**WORKFLOW, "id": "b"}, T0)
    await records.put_workflow(WORKFLOW, T0 + 1)
    await records.put_workflow({**WORKFLOW, "nodes": []}, T0 + 2)  # replaces "triage"
    assert await records.get_workflow("triage") == {**WORKFLOW, "nodes": []}
    listed = await records.list_workflows()
    assert [(w["id"], w["updated_at"]) for w in listed] == [("b", T0), ("triage", T0 + 2)]
    assert await records.delete_workflow("b")
    assert not await records.delete_workflow("b")
    assert await records.get_workflow("b") is None


async def test_worker_heartbeats_show_who_is_alive(open_r: OpenRecords):
    """The last heartbeat of each worker is kept; old ones drop out of a fresh list."""
    records = open_r()
    base = {"host": "h", "pid": 1, "running": 0}
    await records.beat({**base, "id": "w1", "last_heartbeat": T0})
    await records.beat({**base, "id": "w2", "last_heartbeat": T0 + 10})
    await records.beat({**base, "id": "w1", "running": 3, "last_heartbeat": T0 + 20})
    fresh = await records.workers(seen_since=T0 + 5)
    assert [(w["id"], w["running"]) for w in fresh] == [("w1", 3), ("w2", 0)]
    assert [w["id"] for w in await records.workers(seen_since=T0 + 15)] == ["w1"]


async def test_closed_records_say_so(open_r: OpenRecords):
    """A closed handle raises RecordsError naming itself; ping writes."""
    records = open_r()
    await records.ping()
    await records.close()
    with pytest.raises(RecordsError, match="closed"):
        await records.get_run("r1")


async def test_connections_are_stored_and_a_rotation_never_overwrites_a_newer_write(
    open_r: OpenRecords,
):
    """A connection reads back; a write that expects an old secret loses to a newer one."""
    records = open_r()
    first = {"app": "github", "baseUrl": "https://x", "secret": "s1", "key_id": "k1",
             "credential_names": ["token"], "updated_at": T0}  # fmt: skip
    assert await records.put_connection(first)
    assert await records.put_connection({**first, "app": "slack"})
    assert await records.put_connection({**first, "secret": "s2"}, expect_secret="s1")
    assert not await records.put_connection({**first, "secret": "s3"}, expect_secret="s1")
    assert (await records.get_connection("github"))["secret"] == "s2"  # type: ignore[index]
    assert [c["app"] for c in await records.list_connections()] == ["github", "slack"]
    assert await records.delete_connection("slack")
    assert not await records.delete_connection("slack")
    assert await records.get_connection("slack") is None
    assert [c["app"] for c in await records.list_connections()] == ["github"]


async def test_meta_values_can_be_set_once(open_r: OpenRecords):
    """`only_new` keeps the first value; a plain put replaces it."""
    records = open_r()
    assert await records.get_meta("canary") is None
    assert await records.put_meta("canary", "a", only_new=True)
    assert not await records.put_meta("canary", "b", only_new=True)
    assert await records.get_meta("canary") == "a"
    assert await records.put_meta("canary", "c")
    assert await records.get_meta("canary") == "c"


async def test_events_appended_in_batches_keep_their_order_and_numbers(open_r: OpenRecords):
    """append_events (a worker's batch) numbers each run's events on from its last one,
    interleaved runs apart."""
    records = open_r()
    await records.append_event("a", {"event": "one"})
    await records.append_events(
        [("a", {"event": "two"}), ("b", {"event": "b1"}), ("a", {"event": "three"})]
    )
    assert await records.append_event("a", {"event": "four"}) == 4
    assert [(n, e["event"]) for n, e in await records.run_events("a")] == [
        (1, "one"), (2, "two"), (3, "three"), (4, "four"),
    ]  # fmt: skip
    assert [(n, e["event"]) for n, e in await records.run_events("b")] == [(1, "b1")]
    assert [n for n, _ in await records.run_events("a", after=2)] == [3, 4]


async def test_an_update_appends_its_events_in_the_same_write_only_if_made(
    open_r: OpenRecords,
):
    """update_run(..., events=) numbers the events on from the run's last one when the
    write is made, and appends nothing when the change declines."""
    records = open_r()
    assert await records.create_run(run("r1", 1.0))
    await records.append_event("r1", {"event": "run.started"})
    finished = [{"event": "node.finished"}, {"event": "run.finished"}]
    written = await records.update_run(
        "r1", lambda r: {**r, "status": "succeeded"}, events=finished
    )
    assert written is not None and written["status"] == "succeeded"
    assert await records.update_run("r1", lambda r: None, events=[{"event": "lost"}]) is None
    assert [(n, e["event"]) for n, e in await records.run_events("r1")] == [
        (1, "run.started"), (2, "node.finished"), (3, "run.finished"),
    ]  # fmt: skip


async def test_a_change_from_the_last_written_record_skips_the_read_unless_it_is_old(
    open_r: OpenRecords,
):
    """change_run answers the version it wrote; given that record back as `last`, the next
    change is made to it directly. When another process wrote in between, the write is
    refused and the change is made to the current record instead, also when it declined
    the old one."""
    records = open_r()
    assert await records.create_run(run("r1", 1.0))
    started = await records.change_run("r1", lambda r: {**r, "status": "running"})
    assert started is not None and started[0]["status"] == "running"
    again = await records.change_run("r1", lambda r: {**r, "attempts": 7}, last=started)
    assert again is not None and again[1] == started[1] + 1
    assert (await records.get_run("r1"))["attempts"] == 7  # type: ignore[index]
    # another writer: a cancel asked for after `again`
    await records.update_run("r1", lambda r: {**r, "cancel_requested": True})
    seen: list[bool] = []

    def finish(current: dict) -> dict | None:
        seen.append(current["cancel_requested"])
        return {**current, "status": "succeeded"}

    done = await records.change_run("r1", finish, last=again)
    assert seen == [False, True]  # the old record's write was refused
    assert done is not None and done[0]["cancel_requested"] and done[1] == again[1] + 2
    # a change that declines the old record is made to the current one
    declined = await records.change_run(
        "r1", lambda r: None if r["status"] == "running" else {**r, "attempts": 8}, last=again
    )
    assert declined is not None and declined[0]["attempts"] == 8
    assert (await records.get_run("r1"))["status"] == "succeeded"  # type: ignore[index]


async def finished_run(records: Records, run_id: str, created: float, status: str) -> None:
    """A run created at `created` that finished (with `status`) a minute later, with an
    event; or, for `queued` and `running`, one that never finished."""
    assert await records.create_run(run(run_id, created))
    await records.append_event(run_id, {"event": "run.started"})
    done = None if status in ("queued", "running") else created + 60
    await records.update_run(run_id, lambda r: {**r, "status": status, "finished_at": done})


async def test_prune_removes_old_finished_runs_and_their_events_only(open_r: OpenRecords):
    """Runs finished before the cutoff go with their events; runs still queued or running
    stay however old, and so do runs finished after the cutoff (or just before it but
    retried since); finished counts stay; prune is bounded by its limit."""
    records = open_r()
    day = 86_400.0
    for n, status in enumerate(("succeeded", "failed", "cancelled")):
        await finished_run(records, f"old-{status}", T0 + n, status)
    await finished_run(records, "old-queued", T0 + 10, "queued")
    await finished_run(records, "old-running", T0 + 11, "running")
    await finished_run(records, "fresh", T0 + 40 * day, "succeeded")
    await finished_run(records, "late", T0 + 20, "succeeded")
    await records.update_run("late", lambda r: {**r, "finished_at": T0 + 35 * day})
    counts = await records.finished_counts()
    cutoff = T0 + 30 * day
    assert await records.prune_runs(finished_before=cutoff, limit=2) == [
        "old-succeeded",
        "old-failed",
    ]
    assert await records.prune_runs(finished_before=cutoff) == ["old-cancelled"]
    assert await records.prune_runs(finished_before=cutoff) == []
    for gone in ("old-succeeded", "old-failed", "old-cancelled"):
        assert await records.get_run(gone) is None
        assert await records.run_events(gone) == []
    for kept in ("old-queued", "old-running", "fresh", "late"):
        assert (await records.get_run(kept)) is not None, kept
        assert len(await records.run_events(kept)) == 1
    listed, _ = await records.list_runs()
    assert {r["id"] for r in listed} == {"old-queued", "old-running", "fresh", "late"}
    assert await records.finished_counts() == counts


async def test_finished_runs_are_counted_by_workflow_and_status(open_r: OpenRecords):
    """Each turn of a run to a finished status counts once (a retried run counts again);
    other updates do not."""
    records = open_r()
    await records.create_run(run("r1", T0))
    await records.create_run(run("r2", T0, "other"))

    def to(status: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda record: {**record, "status": status}

    for status in ("running", "failed", "failed", "queued", "running", "succeeded"):
        await records.update_run("r1", to(status))
    await records.update_run("r2", to("cancelled"))
    assert await records.finished_counts() == {
        ("triage", "failed"): 1,
        ("triage", "succeeded"): 1,
        ("other", "cancelled"): 1,
    }


async def test_a_run_created_finished_counts_and_starts_its_stream_in_the_same_write(
    open_r: OpenRecords,
):
    """create_run(..., events=): a record created finished (a job the worker rejects)
    counts as finished and holds its events from the first read of it; a create refused
    for a taken id adds neither a count nor an event."""
    records = open_r()
    failed = {**run("r1", T0), "status": "failed", "finished_at": T0}
    finished = [{"event": "run.finished", "status": "failed"}]
    assert await records.create_run(failed, events=finished)
    assert await records.run_events("r1") == [(1, finished[0])]
    assert await records.finished_counts() == {("triage", "failed"): 1}
    assert not await records.create_run(failed, events=[{"event": "again"}])
    assert await records.run_events("r1") == [(1, finished[0])]
    assert await records.finished_counts() == {("triage", "failed"): 1}
    assert await records.create_run(run("r2", T0), events=[])  # queued: not counted
    assert await records.run_events("r2") == []
    assert await records.finished_counts() == {("triage", "failed"): 1}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 400 KiB tmpfs of the test's own (root only), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_a_full_disk_is_a_clear_error_and_the_database_survives(small_disk: Path):
    """Writing runs until the state dir's disk is full raises RecordsError saying so;
    what was stored before still reads back, and writes work again once there is room."""
    records = SqliteRecords(small_disk / "corral.db")
    stored: list[str] = []
    filler = {"blob": "x" * 20_000}
    try:
        with pytest.raises(RecordsError, match="disk is full"):
            for n in range(200):
                record = run(f"r{n}", T0 + n)
                record["input"] = filler
                await records.create_run(record)
                stored.append(record["id"])
        assert stored, "some runs fit before the disk filled"
        for run_id in stored:
            assert (await records.get_run(run_id))["id"] == run_id  # type: ignore[index]
        await records.delete_workflow("none")  # a write that needs no room
    finally:
        await records.close()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    reopened = SqliteRecords(small_disk / "corral.db")
    try:
        assert (await reopened.get_run(stored[0]))["id"] == stored[0]  # type: ignore[index]
        assert await reopened.create_run(run("after", T0 + 1000))
        assert len((await reopened.list_runs(limit=500))[0]) == len(stored) + 1
    finally:
        await reopened.close()


async def test_a_write_that_finds_the_database_locked_waits_off_the_event_loop(tmp_path: Path):
    """The embedded records write on the event loop's own connection only when the database
    is free at once: while another process holds the write lock, a write waits on the
    database thread (the loop keeps running) and lands once the lock is released."""
    import sqlite3

    records = SqliteRecords(tmp_path / "corral.db")
    try:
        assert await records.create_run(run("before", T0))
        holder = sqlite3.connect(tmp_path / "corral.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            write = asyncio.create_task(records.create_run(run("during", T0 + 1)))
            ticks = 0
            for _ in range(20):  # the loop is not blocked while the write waits
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 20 and not write.done()
            assert (await records.get_run("before"))["id"] == "before"  # reads go on
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert await asyncio.wait_for(write, 10)
        assert (await records.get_run("during"))["status"] == "queued"
    finally:
        await records.close()


async def _subscribed(url: str, prefix: str, topics: Iterable[str]) -> None:
    """Return once Redis has a subscriber on each topic's channel (a subscription is made on
    the loop, after `subscribe` returns)."""
    client = redis.asyncio.Redis.from_url(url)
    async with asyncio.timeout(10):
        while not all(n for _, n in await client.pubsub_numsub(
            *(f"{prefix}changes:{topic}" for topic in topics)
        )):  # fmt: skip
            await asyncio.sleep(0.01)
    await client.aclose()


WRITER = """
import asyncio, sys
from corral.service.records import RedisRecords, SqliteRecords, new_run

async def main(kind, place, prefix):
    records = SqliteRecords(place) if kind == "sqlite" else RedisRecords(place, prefix=prefix)
    await records.create_run(new_run("r1", {"id": "w", "nodes": []}, {}, 1.0))
    await records.append_events([("r1", {"event": "run.started"})])
    await records.update_run("r1", lambda run: {**run, "status": "succeeded"})
    await records.close()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_writes_by_another_process_wake_this_ones_subscribers(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """A run finished and an event appended in another process set the events subscribed
    here to `runs` and `events` (SQLite: inotify on the state dir's topic files; Redis: a
    published channel), and nothing set one subscribed to `cancels`."""
    prefix = f"test:{uuid.uuid4().hex}:"
    if kind == "sqlite":
        place = str(tmp_path / "corral.db")
        records: Records = SqliteRecords(place)
    else:
        place = request.getfixturevalue("redis_url")
        records = RedisRecords(place, prefix=prefix)
    try:
        changes = records.changes()
        assert changes.live
        heard = {topic: asyncio.Event() for topic in ("runs", "events", "cancels")}
        for topic, event in heard.items():
            changes.subscribe(topic, event)
        if kind == "redis":  # listening: each subscriber is woken once, to look again
            async with asyncio.timeout(10):
                for event in heard.values():
                    await event.wait()
                    event.clear()
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, kind, place, prefix
        )
        assert await asyncio.wait_for(writer.wait(), 30) == 0
        async with asyncio.timeout(10):
            await heard["runs"].wait()
            await heard["events"].wait()
        assert not heard["cancels"].is_set()
        changes.unsubscribe("runs", heard["runs"])
        heard["runs"].clear()
        await changes.ring("runs")
        await changes.ring("cancels")
        async with asyncio.timeout(10):
            await heard["cancels"].wait()
        assert not heard["runs"].is_set()  # unsubscribed
    finally:
        await records.close()


async def test_a_topic_file_removed_and_made_again_is_still_heard(tmp_path: Path):
    """Each topic's file is watched on its own; when one is removed (a clean-up of the state
    dir), the ring that makes it again is heard, and so are the rings after it."""
    records = SqliteRecords(str(tmp_path / "corral.db"))
    writer = SqliteRecords(str(tmp_path / "corral.db"))  # as another process would
    try:
        changes, other = records.changes(), writer.changes()
        runs, queue = asyncio.Event(), asyncio.Event()
        changes.subscribe("runs", runs)
        changes.subscribe("queue", queue)
        (tmp_path / "changes" / "runs").unlink()
        await other.ring("runs")
        async with asyncio.timeout(10):
            await runs.wait()
        runs.clear()
        await asyncio.sleep(0.05)  # the removal's own notices are read, and nothing more
        assert not runs.is_set() and not queue.is_set()
        await other.ring("runs")
        async with asyncio.timeout(10):
            await runs.wait()
        assert not queue.is_set()
        assert changes.live
    finally:
        await records.close()
        await writer.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_only_a_finished_run_rings_runs(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """`runs` tells waiters that a run finished: creating a queued run and moving it to
    running ring nothing; the write that finishes it rings, naming the run and carrying
    its finished record where the backend carries names (Redis), else ANY (look at every
    run)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    if kind == "sqlite":
        records: Records = SqliteRecords(str(tmp_path / "corral.db"))
    else:
        url = request.getfixturevalue("redis_url")
        records = RedisRecords(url, prefix=prefix)
    try:
        changes, finished, names = records.changes(), asyncio.Event(), set()
        changes.subscribe("runs", finished, names)
        if kind == "redis":  # listening: woken once, to look again
            async with asyncio.timeout(10):
                await finished.wait()
            finished.clear()
            names.clear()
        await records.create_run(new_run("r1", {"id": "w", "nodes": []}, {}, 1.0))
        await records.update_run("r1", lambda run: {**run, "status": "running"})
        await asyncio.sleep(0.2)  # a ring would be heard well within this
        assert not finished.is_set() and not names
        await records.update_run("r1", lambda run: {**run, "status": "failed"})
        async with asyncio.timeout(10):
            await finished.wait()
        if kind == "redis":
            ((run_id, carried),) = map(finished_ring, names)
            assert run_id == "r1" and json.loads(carried) == await records.get_run("r1")
        else:
            assert names == {ANY}
    finally:
        await records.close()


async def test_a_wait_on_redis_answers_the_record_its_finish_carried(redis_url: str):
    """On Redis the finish's ring carries the finished record, which the wait answers (the
    API need not read it back); a record over RING_RECORD_MAX is not carried, and the wait
    answers None (read it)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    api, worker = RedisRecords(redis_url, prefix=prefix), RedisRecords(redis_url, prefix=prefix)
    waiter = RunWaiter(api)
    try:
        answers = []
        for run_id, size in (("small", 10), ("large", RING_RECORD_MAX)):
            await worker.create_run({**run(run_id, T0), "input": {"pad": "x" * size}})
            waiting = asyncio.create_task(waiter.wait(run_id, 10))
            await _subscribed(redis_url, prefix, ["runs"])
            await asyncio.sleep(0.1)  # the wait's first look is made: only the ring ends it
            await worker.update_run(run_id, lambda r: {**r, "status": "succeeded"})
            answers.append(await asyncio.wait_for(waiting, 10))
        assert answers == [await api.get_run("small"), None]
    finally:
        await waiter.close()
        await api.close()
        await worker.close()


async def test_a_forged_ring_s_record_is_read_back_and_the_waits_go_on(redis_url: str):
    """Anyone who can publish on the `runs` channel can send anything: a carried text that
    is not JSON, nested past the parser's depth, or not the awaited run's finished record is
    not answered (the wait answers None: read it back), and the waits' loop goes on."""
    prefix = f"test:{uuid.uuid4().hex}:"
    api = RedisRecords(redis_url, prefix=prefix)
    waiter = RunWaiter(api)
    queued = run("forged", T0)
    carried = [
        "{not json",
        "[" * 100_000,
        json.dumps({**queued, "id": "other", "status": "succeeded"}),
        json.dumps(queued),
    ]
    try:
        await api.create_run(queued)
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            for text in carried:
                waiting = asyncio.create_task(waiter.wait("forged", 30))  # a dead loop: 30 s
                await _subscribed(redis_url, prefix, ["runs"])
                await asyncio.sleep(0.1)  # the wait's first look is made: only the ring ends it
                await client.publish(f"{prefix}changes:runs", f"forged\n{text}")
                assert await asyncio.wait_for(waiting, 10) is None, text[:20]
    finally:
        await waiter.close()
        await api.close()


async def test_a_ring_heard_before_a_wait_began_does_not_answer_it(redis_url: str):
    """A finish's ring heard while a look is on its way waits for the next pass; a wait
    begun meanwhile on that run (GET ?wait_s after a retry queued it again) is not answered
    with that earlier finish: its run is looked at, found queued, and the wait goes on.
    Found by a review."""
    prefix = f"test:{uuid.uuid4().hex}:"
    api, worker = RedisRecords(redis_url, prefix=prefix), RedisRecords(redis_url, prefix=prefix)
    real_read = api.run_statuses
    slow = asyncio.Event()

    async def read(run_ids: list[str]) -> dict[str, str | None]:
        if slow.is_set():
            await asyncio.sleep(0.5)  # a look on its way (a slow link, a busy loop)
        return await real_read(run_ids)

    api.run_statuses = read  # type: ignore[method-assign]
    waiter = RunWaiter(api)
    other: asyncio.Task[Any] | None = None
    try:
        await worker.create_run(run("other", T0))
        await worker.create_run(run("x", T0))
        other = asyncio.create_task(waiter.wait("other", 10))  # keeps the loop looking
        await _subscribed(redis_url, prefix, ["runs"])
        await asyncio.sleep(0.3)
        slow.set()
        await asyncio.sleep(0.3)  # the look at every awaited run is on its way
        await worker.update_run("x", lambda r: {**r, "status": "failed"})
        await worker.update_run("x", lambda r: {**r, "status": "queued"})  # retried: no ring
        started = time.monotonic()
        assert await waiter.wait("x", 1.5) is None
        assert time.monotonic() - started >= 1.5  # x is queued: the wait went to its end
    finally:
        if other is not None:
            other.cancel()
            await asyncio.gather(other, return_exceptions=True)
        await waiter.close()
        await api.close()
        await worker.close()


async def test_a_lost_ring_does_not_hold_a_wait_while_other_runs_ring(redis_url: str):
    """Redis drops what is published while no subscription listens (a subscription being
    renewed, a reconnect). A run whose finish was not heard, while other runs keep
    finishing and ringing, still ends its wait within a second (every awaited run is
    looked at every LOOK_ALL_S), not at the wait's time-out."""
    prefix = f"test:{uuid.uuid4().hex}:"
    api, worker = RedisRecords(redis_url, prefix=prefix), RedisRecords(redis_url, prefix=prefix)
    waiter = RunWaiter(api)
    flowing = True

    async def others() -> None:  # another run finishes (and rings) every 5 ms
        n = 0
        while flowing:
            n += 1
            await worker.create_run(new_run(f"other-{n}", {"id": "w", "nodes": []}, {}, 1.0))
            await worker.update_run(f"other-{n}", lambda run: {**run, "status": "succeeded"})
            await asyncio.sleep(0.005)

    try:
        await worker.create_run(new_run("r1", {"id": "w", "nodes": []}, {}, 1.0))
        background = asyncio.create_task(others())
        waiting = asyncio.create_task(waiter.wait("r1", 10))
        await _subscribed(redis_url, prefix, ["runs"])
        await asyncio.sleep(0.3)  # the waiter has looked at r1, and now hears only names
        async with redis.asyncio.Redis.from_url(redis_url) as client:  # a finish not heard
            await client.hset(f"{prefix}run:r1", "status", "succeeded")
        finished = time.monotonic()
        await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - finished < 3.0  # a look at all, not the 10 s time-out
    finally:
        flowing = False
        await asyncio.gather(background, return_exceptions=True)
        await waiter.close()
        await api.close()
        await worker.close()


async def test_a_wait_that_queues_its_run_waits_for_its_finish(open_r: OpenRecords):
    """RunWaiter.wait(..., queue=): the wait starts before the run is queued, so looks at
    every awaited run (on start, on a poll) find no record yet; that is not a run gone,
    and the wait ends when the run finishes. An error of the queueing is raised, with no
    wait left behind."""
    records = open_r()
    waiter = RunWaiter(records)

    async def queue() -> None:
        await asyncio.sleep(0.6)  # over LOOK_ALL_S and the slowest poll: looks find nothing
        assert await records.create_run(run("r1", 1.0))

    async def refused() -> None:
        raise ValueError("run r2 exists")

    try:
        waiting = asyncio.create_task(waiter.wait("r1", 10, queue=queue()))
        await asyncio.sleep(0.9)
        while await records.get_run("r1") is None:  # queued late on a loaded machine
            await asyncio.sleep(0.01)
        assert not waiting.done()
        await records.update_run("r1", lambda r: {**r, "status": "succeeded"})
        await asyncio.wait_for(waiting, 5)
        with pytest.raises(ValueError, match="r2 exists"):
            await waiter.wait("r2", 10, queue=refused())
        assert not waiter._waits and not waiter._queuing
    finally:
        await waiter.close()


async def test_a_look_read_before_the_run_was_queued_does_not_end_its_wait(
    open_r: OpenRecords,
):
    """A look at every awaited run reads "no record" for a run still being queued, and its
    answer comes back only after the queueing ended (a slow link, a busy loop): the run is
    not gone for that, and the wait goes on to its time-out. Found by a review."""
    records = open_r()
    real_read = records.run_statuses

    async def answered_late(run_ids: list[str]) -> dict[str, str | None]:
        statuses = await real_read(run_ids)  # the read is made now, its answer comes later
        await asyncio.sleep(0.05)
        return statuses

    records.run_statuses = answered_late  # type: ignore[method-assign]
    waiter = RunWaiter(records)

    async def queue() -> None:
        await asyncio.sleep(0.01)  # while the first look's read is on its way
        assert await records.create_run(run("r1", 1.0))

    try:
        started = time.monotonic()
        await waiter.wait("r1", 1.0, queue=queue())
        assert time.monotonic() - started >= 1.0
        assert (await records.get_run("r1"))["status"] == "queued"  # type: ignore[index]
    finally:
        await waiter.close()


async def test_a_redis_subscription_wakes_its_subscribers_once_it_listens(redis_url: str):
    """What was published before a subscription listened is lost: once it listens (the
    first, and each renewal for a new topic), its subscribers are woken to look at
    everything (ANY), with no ring."""
    records = RedisRecords(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        changes, runs, names = records.changes(), asyncio.Event(), set()
        changes.subscribe("runs", runs, names)
        async with asyncio.timeout(10):
            await runs.wait()
        assert names == {ANY}
        runs.clear()
        names.clear()
        changes.subscribe("events", asyncio.Event())  # a new topic renews the subscription
        async with asyncio.timeout(10):
            await runs.wait()
        assert names == {ANY}
    finally:
        await records.close()


async def test_an_upgraded_state_dir_keeps_what_its_corral_db_held(tmp_path: Path, clean_env):
    """Records and queue were kept in the runtime store's corral.db before they had files
    of their own: opening a state dir laid out that way finds every row in the new files
    (a second opening copies nothing twice), and the runtime store's rows stay where they
    are."""
    state = tmp_path / "state"
    state.mkdir()
    async with SqliteStore(state / "corral.db") as store:  # the layout of before
        await store.put_json("cursor", {"page": 3})
    async with SqliteRecords(state / "corral.db") as old:
        await old.put_workflow(WORKFLOW, T0)
        assert await old.create_run(run("r1", T0))
        await old.append_event("r1", {"event": "run.started"})
        await old.put_meta("key_canary", "sealed")
    old_queue = SqliteQueue(state / "corral.db", lease_s=30, max_reclaims=3)
    assert await old_queue.enqueue("r1", {"run_id": "r1"})
    await old_queue.close()
    settings = load_settings(CORRAL_STATE_DIR=str(state))
    for _ in range(2):
        records, queue = open_records(settings), open_queue(settings)
        try:
            assert await records.get_workflow("triage") == WORKFLOW
            assert (await records.get_run("r1"))["status"] == "queued"  # type: ignore[index]
            assert [e["event"] for _, e in await records.run_events("r1")] == ["run.started"]
            assert await records.get_meta("key_canary") == "sealed"
            assert await queue.counts() == {"waiting": 1, "active": 0}
        finally:
            await records.close()
            await queue.close()
    assert sorted(p.name for p in state.glob("*.db")) == ["corral.db", "queue.db", "records.db"]
    async with SqliteStore(state / "corral.db") as store:
        assert await store.get_json("cursor") == {"page": 3}
