"""The run queue, one suite over both implementations: the embedded SQLite queue in a
temporary state directory, and BullMQ on a real redis-server on 127.0.0.1 (conftest's)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import redis.asyncio
from bullmq.redis_connection import loadScript
from conftest import free_port

from corral import ConfigError
from corral.config import load_settings
from corral.service import Lease, QueueError, RunQueue, SqliteQueue, open_queue
from corral.service.queue._bullmq import QUEUE_NAME, BullmqQueue

pytestmark = pytest.mark.anyio

LEASE_S = 30.0  # long enough never to lapse inside a test that does not wait for it
SHORT_LEASE_S = 0.4
RECLAIM_PATIENCE_S = 10.0  # BullMQ takes a lapsed lease back on the second check: ~2 leases

OpenQueue = Callable[..., RunQueue]


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, as the service does."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "bullmq"])
async def open_q(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenQueue]:
    """Opens queues on one fresh place (a SQLite file, or a fresh BullMQ prefix), as many
    as a test wants (several workers), and closes them all at the end."""
    opened: list[RunQueue] = []
    prefix = f"t{uuid.uuid4().hex[:12]}"
    url = request.getfixturevalue("redis_url") if request.param == "bullmq" else ""

    def open_one(lease_s: float = LEASE_S, max_reclaims: int = 2) -> RunQueue:
        if request.param == "sqlite":
            queue: RunQueue = SqliteQueue(
                tmp_path / "corral.db", lease_s=lease_s, max_reclaims=max_reclaims
            )
        else:
            queue = BullmqQueue(url, lease_s=lease_s, max_reclaims=max_reclaims, prefix=prefix)
        opened.append(queue)
        return queue

    open_one.kind = request.param  # type: ignore[attr-defined]
    open_one.prefix = prefix  # type: ignore[attr-defined]
    yield open_one
    for queue in opened:
        await queue.close()


async def reclaimed(queue: RunQueue) -> Lease:
    """The next lease, calling reclaim() as a worker would until a lapsed one comes back."""
    deadline = time.monotonic() + RECLAIM_PATIENCE_S
    while time.monotonic() < deadline:
        await queue.reclaim()
        lease = await queue.claim()
        if lease is not None:
            return lease
        await asyncio.sleep(0.05)
    raise AssertionError(f"no lease came back within {RECLAIM_PATIENCE_S} s")


async def test_a_run_is_queued_once_and_leased_with_its_data(open_q: OpenQueue):
    """A run id is in the queue at most once; a claim hands out its JSON data and a token."""
    queue = open_q()
    assert await queue.enqueue("r1", {"run_id": "r1", "input": {"n": 1}})
    assert not await queue.enqueue("r1", {"run_id": "r1", "input": {"n": 2}})
    assert await queue.counts() == {"waiting": 1, "active": 0}
    lease = await queue.claim()
    assert lease is not None
    assert (lease.run_id, lease.data, lease.reclaims, lease.lost) == (
        "r1",
        {"run_id": "r1", "input": {"n": 1}},
        0,
        False,
    )
    assert lease.token
    assert not await queue.enqueue("r1", {"run_id": "r1"}), "a leased run is still queued"
    assert await queue.counts() == {"waiting": 0, "active": 1}
    assert await queue.claim() is None
    assert await queue.complete(lease)
    assert await queue.counts() == {"waiting": 0, "active": 0}
    assert await queue.enqueue("r1", {"run_id": "r1"}), "a finished run may be queued again"


async def test_concurrent_enqueues_of_one_run_add_it_once(open_q: OpenQueue):
    """Many enqueues of one run id at once, from several queue handles (processes, on other
    machines): exactly one says it added the run, and the run is there once."""
    handles = [open_q() for _ in range(4)]
    if open_q.kind == "bullmq":  # type: ignore[attr-defined]
        await handles[0]._client.script_flush()  # type: ignore[attr-defined]  # first use
    for round_ in range(5):
        run_id = f"r{round_}"
        added = await asyncio.gather(
            *(queue.enqueue(run_id, {"n": n}) for n in range(8) for queue in handles)
        )
        assert added.count(True) == 1, added
    assert await handles[0].counts() == {"waiting": 5, "active": 0}
    leases = [await handles[1].claim() for _ in range(6)]
    assert sorted(lease.run_id for lease in leases if lease) == [f"r{n}" for n in range(5)]


async def test_runs_are_leased_oldest_first(open_q: OpenQueue):
    """Runs come out in the order they were queued."""
    queue = open_q()
    for n in range(5):
        await queue.enqueue(f"r{n}", {"n": n})
    order = []
    while (lease := await queue.claim()) is not None:
        order.append(lease.run_id)
        await queue.complete(lease)
    assert order == [f"r{n}" for n in range(5)]


async def test_a_waiting_claim_gets_a_run_queued_by_another_process(open_q: OpenQueue):
    """A claim that waits returns as soon as another queue handle enqueues; an empty one
    gives up after its wait."""
    worker, producer = open_q(), open_q()
    started = time.monotonic()
    assert await worker.claim(wait_s=0.3) is None
    assert time.monotonic() - started >= 0.3
    claim = asyncio.create_task(worker.claim(wait_s=5))
    await asyncio.sleep(0.2)
    await producer.enqueue("late", {"n": 1})
    lease = await asyncio.wait_for(claim, 5)
    assert lease is not None and lease.run_id == "late"


async def test_concurrent_workers_never_lease_the_same_run(open_q: OpenQueue):
    """Three workers claiming at once share the runs: each run is leased exactly once."""
    producer = open_q()
    for n in range(30):
        await producer.enqueue(f"r{n}", {"n": n})
    workers = [open_q() for _ in range(3)]

    async def drain(queue: RunQueue) -> list[str]:
        got = []
        while (lease := await queue.claim()) is not None:
            got.append(lease.run_id)
            assert await queue.complete(lease)
        return got

    results = await asyncio.gather(*(drain(w) for w in workers))
    everything = [run_id for got in results for run_id in got]
    assert sorted(everything) == sorted(f"r{n}" for n in range(30))


async def test_only_the_current_token_touches_a_leased_run(open_q: OpenQueue):
    """Renew, complete, fail and hand-back answer False for a token that is not the lease's."""
    queue = open_q()
    await queue.enqueue("r1", {})
    lease = await queue.claim()
    assert lease is not None
    forged = replace(lease, token=uuid.uuid4().hex)
    assert not await queue.renew(forged)
    assert not await queue.complete(forged)
    assert not await queue.fail(forged, "boom")
    assert not await queue.release(forged)
    assert await queue.counts() == {"waiting": 0, "active": 1}
    assert await queue.renew(lease)
    assert await queue.fail(lease, "boom")
    assert not await queue.complete(lease), "a finished run is no longer anyone's"
    assert await queue.counts() == {"waiting": 0, "active": 0}


async def test_a_lapsed_lease_is_taken_back_and_the_stale_worker_locked_out(open_q: OpenQueue):
    """A worker that stops renewing loses its run to the next claim, and can no longer
    complete, renew or hand it back."""
    dead, alive = open_q(lease_s=SHORT_LEASE_S), open_q(lease_s=SHORT_LEASE_S)
    await dead.enqueue("r1", {"n": 1})
    stale = await dead.claim()
    assert stale is not None
    again = await reclaimed(alive)
    assert (again.run_id, again.data, again.reclaims, again.lost) == ("r1", {"n": 1}, 1, False)
    assert again.token != stale.token
    assert not await dead.complete(stale)
    assert not await dead.renew(stale)
    assert not await dead.release(stale)
    assert await alive.complete(again)


async def test_a_renewed_lease_is_never_taken_back(open_q: OpenQueue):
    """While its worker renews the lease, reclaim() leaves the run alone."""
    lease_s = 1.0  # renewed every 0.1 s: a loaded machine's stall must pass 0.9 s to lapse it
    queue = open_q(lease_s=lease_s)
    other = open_q(lease_s=lease_s)
    await queue.enqueue("r1", {})
    lease = await queue.claim()
    assert lease is not None
    deadline = time.monotonic() + 3 * lease_s
    while time.monotonic() < deadline:
        assert await queue.renew(lease)
        assert await other.reclaim() == []
        assert await other.claim() is None
        await asyncio.sleep(lease_s / 10)
    assert await queue.complete(lease)


async def test_a_run_whose_workers_keep_dying_fails_as_worker_lost(open_q: OpenQueue):
    """After max_reclaims take-backs the next claim fails the run (lost), never silently
    runs it again, and it leaves the queue."""
    queue = open_q(lease_s=SHORT_LEASE_S, max_reclaims=1)
    await queue.enqueue("r1", {"n": 1})
    first = await queue.claim()
    assert first is not None and first.reclaims == 0
    second = await reclaimed(queue)
    assert (second.reclaims, second.lost) == (1, False)
    third = await reclaimed(queue)
    assert (third.run_id, third.lost) == ("r1", True)
    assert await queue.counts() == {"waiting": 0, "active": 0}
    assert await queue.claim() is None
    assert await queue.enqueue("r1", {}), "a lost run may be retried"


async def test_a_handed_back_run_waits_again_without_counting_as_lost(open_q: OpenQueue):
    """A stopping worker hands a run back: another worker leases it at once, reclaims 0."""
    queue, other = open_q(), open_q()
    await queue.enqueue("r1", {"n": 1})
    lease = await queue.claim()
    assert lease is not None
    assert await queue.release(lease)
    assert await queue.counts() == {"waiting": 1, "active": 0}
    again = await other.claim(wait_s=2)
    assert again is not None
    assert (again.run_id, again.reclaims, again.lost) == ("r1", 0, False)
    assert not await queue.complete(lease)


async def test_only_a_waiting_run_can_be_removed(open_q: OpenQueue):
    """Cancelling a queued run removes it; a leased one stays with its worker."""
    queue = open_q()
    await queue.enqueue("waiting", {})
    await queue.enqueue("leased", {})
    await queue.enqueue("other", {})
    assert await queue.remove("other")
    lease = await queue.claim()
    assert lease is not None and lease.run_id == "waiting"
    assert not await queue.remove("waiting")
    assert await queue.remove("leased")
    assert not await queue.remove("never-queued")
    assert await queue.counts() == {"waiting": 0, "active": 1}


async def test_a_closed_queue_says_so(open_q: OpenQueue):
    """Calls on a closed queue raise QueueError naming it; closing twice is harmless."""
    queue = open_q()
    await queue.ping()
    await queue.close()
    await queue.close()
    with pytest.raises(QueueError, match="closed"):
        await queue.enqueue("r1", {})


async def put_raw_job(where: str | Path, run_id: str, raw: str, prefix: str = "bull") -> None:
    """A job whose data is `raw` as it is, the way a foreign producer could queue it: a row
    in the SQLite queue at `where` (a path), or a job added through BullMQ's own Lua
    script on the Redis at `where` (a URL)."""
    if isinstance(where, Path):
        with sqlite3.connect(where) as conn:
            conn.execute(
                "INSERT INTO run_queue (run_id, data, state, enqueued_at) "
                "VALUES (?, ?, 'waiting', ?)",
                (run_id, raw, time.time()),
            )
        return
    client = redis.asyncio.Redis.from_url(where)
    try:
        add = client.register_script(loadScript("addStandardJob-9.lua"))
        base = f"{prefix}:{QUEUE_NAME}:"
        names = ["wait", "paused", "meta", "id", "completed", "delayed", "active", "events"]
        keys = [base + name for name in names] + [base + "marker"]
        jid = f"run-{run_id}"
        packed = msgpack.packb(
            [base, jid, "run", round(time.time() * 1000), None, None, None, None, None]
        )
        opts = msgpack.packb({"attempts": 1, "jobId": jid, "delay": 0})
        assert (await add(keys=keys, args=[packed, raw, opts])).decode() == jid
    finally:
        await client.aclose()


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"a string"'])
async def test_a_job_whose_data_is_unusable_is_failed_once_and_the_queue_goes_on(
    open_q: OpenQueue, tmp_path: Path, raw: str
):
    """Data that is not JSON, or not a JSON object: the claim that meets it takes the job
    out of the queue for good and says why (Lease.invalid); the next claim serves the
    next run, and the bad job never comes back, also after its lease would have lapsed."""
    lease_s = 1.0  # the first lease must outlast two claims and a count on a loaded machine
    queue = open_q(lease_s=lease_s)
    where = tmp_path / "corral.db" if open_q.kind == "sqlite" else queue.url  # type: ignore[attr-defined]
    await queue.enqueue("first", {"n": 1})
    await put_raw_job(where, "bad", raw, prefix=open_q.prefix)  # type: ignore[attr-defined]
    await queue.enqueue("after", {"n": 2})
    leases = [await queue.claim() for _ in range(3)]
    assert [lease.run_id for lease in leases if lease] == ["first", "bad", "after"]
    bad = leases[1]
    assert bad is not None and bad.data == {} and not bad.lost
    assert bad.invalid and ("not valid JSON" in bad.invalid or "JSON object" in bad.invalid)
    assert leases[0].invalid is None and leases[2].invalid is None  # type: ignore[union-attr]
    assert await queue.counts() == {"waiting": 0, "active": 2}
    for lease in (leases[0], leases[2]):
        assert await queue.complete(lease)  # type: ignore[arg-type]
    await asyncio.sleep(lease_s * 1.5)
    for _ in range(3):  # BullMQ's stalled check takes a lapsed lease back on its second look
        await queue.reclaim()
        await asyncio.sleep(lease_s)
    assert await queue.claim() is None
    assert await queue.counts() == {"waiting": 0, "active": 0}


async def test_a_node_producer_can_enqueue_runs(redis_url: str):
    """A job added the way Node's BullMQ adds it (addStandardJob, msgpack arguments, data
    as JSON.stringify writes it) is a run a corral worker leases."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    queue = BullmqQueue(redis_url, lease_s=LEASE_S, max_reclaims=2, prefix=prefix)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        add = client.register_script(loadScript("addStandardJob-9.lua"))
        base = f"{prefix}:{QUEUE_NAME}:"
        names = ["wait", "paused", "meta", "id", "completed", "delayed", "active", "events"]
        keys = [base + name for name in names] + [base + "marker"]
        now_ms = round(time.time() * 1000)
        packed = msgpack.packb([base, "run-from-node", "run", now_ms, None, None, None, None, None])
        data = json.dumps({"workflow": "triage", "input": {"title": "x"}}, separators=(",", ":"))
        opts = msgpack.packb({"attempts": 1, "jobId": "run-from-node", "delay": 0})
        assert (await add(keys=keys, args=[packed, data, opts])).decode() == "run-from-node"
        lease = await queue.claim()
        assert lease is not None
        assert (lease.run_id, lease.data) == (
            "from-node",
            {"workflow": "triage", "input": {"title": "x"}},
        )
        assert await queue.complete(lease)
        assert await queue.counts() == {"waiting": 0, "active": 0}
    finally:
        await client.aclose()
        await queue.close()


async def test_a_job_that_is_not_a_run_is_failed_not_leased(redis_url: str):
    """A job without the run-<id> id is failed with a reason and skipped."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    queue = BullmqQueue(redis_url, lease_s=LEASE_S, max_reclaims=2, prefix=prefix)
    try:
        await queue._queue.add("other", {"x": 1}, {"jobId": "not-a-run"})
        await queue.enqueue("r1", {})
        lease = await queue.claim()
        assert lease is not None and lease.run_id == "r1"
        assert await queue._queue.getJobState("not-a-run") == "unknown"
    finally:
        await queue.close()


async def test_an_unreachable_redis_raises_queue_error():
    """A queue whose Redis is gone raises QueueError naming it (password masked) quickly."""
    queue = BullmqQueue(
        f"redis://:secret@127.0.0.1:{free_port()}/0", lease_s=LEASE_S, max_reclaims=2
    )
    started = time.monotonic()
    try:
        with pytest.raises(QueueError, match=r"Redis at redis://:\*\*\*@127\.0\.0\.1"):
            await queue.ping()
        with pytest.raises(QueueError):
            await queue.claim()
    finally:
        await queue.close()
    assert time.monotonic() - started < 10


async def test_open_queue_follows_the_settings(tmp_path: Path, redis_url: str, clean_env):
    """Embedded in CORRAL_STATE_DIR by default; BullMQ when CORRAL_REDIS_URL is set."""
    embedded = open_queue(load_settings(CORRAL_STATE_DIR=str(tmp_path / "state")))
    try:
        assert embedded.kind == "sqlite"
        assert (tmp_path / "state" / "queue.db").exists()
    finally:
        await embedded.close()
    shared = open_queue(load_settings(CORRAL_REDIS_URL=redis_url, CORRAL_LEASE_S="7"))
    try:
        assert (shared.kind, shared.lease_s, shared.max_reclaims) == ("bullmq", 7.0, 2)
        await shared.ping()
    finally:
        await shared.close()


async def test_open_queue_refuses_an_unwritable_state_dir(tmp_path: Path, clean_env):
    """A state dir that cannot be created is one ConfigError naming CORRAL_STATE_DIR."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"CORRAL_STATE_DIR=.*point it at a writable"):
        open_queue(load_settings(CORRAL_STATE_DIR=str(blocker / "state")))
