"""The state store: idempotency, shared circuit breakers and keyed state, on SQLite and Redis.

Every test taking `store` runs on both: SQLite in a temporary directory, and a real
redis-server this module starts on 127.0.0.1 (no persistence) and stops at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio
from conftest import SERVER_PIDS, free_port, stop

from corral import ConfigError
from corral.config import load_settings
from corral.runtime import (
    BreakerState,
    Claim,
    RedisStore,
    SqliteStore,
    Store,
    StoreError,
    open_store,
)
from corral.runtime.store._redis import REDIS_CONNECT_TIMEOUT_S, REDIS_TIMEOUT_S
from corral.service.queue._bullmq import BullmqQueue
from corral.service.records._redis import RedisRecords

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
TTL_S = 600
RESET_MS = 1_000
# No persistence, loopback only: a throwaway server for this session.
ROUNDS = 50  # keys each racing process or thread contends for


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Target:
    """Where a store lives: enough to open it again, here or in another process."""

    kind: str
    where: str  # the SQLite file or the Redis URL
    prefix: str = ""

    def open(self, clock: Clock) -> Store:
        if self.kind == "sqlite":
            return SqliteStore(self.where, clock=clock)
        return RedisStore(self.where, prefix=self.prefix, clock=clock)


@pytest.fixture(autouse=True)
def no_child_processes() -> Iterator[None]:
    """Every test reaps the processes it starts (the session's redis-server aside)."""
    yield
    me = psutil.Process()
    children = [p for p in me.children(recursive=True) if p.pid not in SERVER_PIDS]
    assert not children, f"child processes left behind: {children}"


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, as the runtime does."""
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh place for a store: a new SQLite file, or a new key prefix on the Redis server."""
    if request.param == "sqlite":
        return Target("sqlite", str(tmp_path / "corral.db"))
    return Target("redis", request.getfixturevalue("redis_url"), f"test:{uuid.uuid4().hex}:")


@pytest.fixture
def clock() -> Clock:
    """The time every store of the test reads."""
    return Clock()


@pytest.fixture
async def store(target: Target, clock: Clock) -> AsyncIterator[Store]:
    """The store under test, on the test's clock, closed after the test."""
    async with target.open(clock) as opened:
        yield opened


# -- other processes ------------------------------------------------------------------

_CHILD = r"""
import asyncio, json, sys, time
from corral.runtime import RedisStore, SqliteStore

spec = json.loads(sys.argv[1])

async def main():
    clock = lambda: spec["now"]
    if spec["kind"] == "sqlite":
        store = SqliteStore(spec["where"], clock=clock)
    else:
        store = RedisStore(spec["where"], prefix=spec["prefix"], clock=clock)
    async with store:
        await store.breaker_state("warm-up")  # connected before the race starts
        print("ready", flush=True)
        start = float(sys.stdin.readline())
        time.sleep(max(0.0, start - time.time() - 0.005))
        while time.time() < start:  # spin the last milliseconds: all children go together
            pass
        out = []
        for n in range(spec["rounds"]):  # one race per key: many chances to catch a lost update
            if spec["op"] == "claim":
                out.append((await store.claim(f"race-{n}", "fp", lease_s=60, ttl_s=600)).state)
            else:
                out.append((await store.breaker_admit(f"race-{n}", reset_ms=1000))[0])
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def _race_in_processes(target: Target, op: str, now: float, count: int) -> list[list[Any]]:
    """Run `op` on keys race-0.. in each of `count` fresh processes started at one instant.

    The answers, per key: what each process got.
    """
    spec = json.dumps({**vars(target), "op": op, "now": now, "rounds": ROUNDS})
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, spec],
            cwd=REPO,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stderr is not None
            if child.stdout.readline().strip() != "ready":
                raise AssertionError(f"child failed: {child.stderr.read()}")
        start = time.time() + 0.1  # all connected: they go at this instant
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{start!r}\n")
            child.stdin.flush()
        answers = []
        for child in children:
            out, err = child.communicate(timeout=30)
            assert child.returncode == 0, err
            answers.append(json.loads(out))
        return [list(per_key) for per_key in zip(*answers, strict=True)]
    finally:
        for child in children:
            stop(child)


# -- idempotency ------------------------------------------------------------------------


async def test_a_finished_key_replays_its_result(store: Store):
    """Claim, finish, and a second claim replays the stored result instead of running."""
    first = await store.claim("run1/node", "fp1", lease_s=30, ttl_s=TTL_S)
    assert first.state == "claimed" and first.token
    await store.finish("run1/node", "fp1", {"output": {"id": 7}}, ttl_s=TTL_S)
    again = await store.claim("run1/node", "fp1", lease_s=30, ttl_s=TTL_S)
    assert again == Claim("replay", {"output": {"id": 7}}, "fp1")


async def test_the_same_key_with_other_params_is_a_conflict(store: Store):
    """A key known with another fingerprint conflicts, in flight or finished, naming it."""
    await store.claim("k", "fp1", lease_s=30, ttl_s=TTL_S)
    assert await store.claim("k", "fp2", lease_s=30, ttl_s=TTL_S) == Claim("conflict", None, "fp1")
    await store.finish("k", "fp1", {"output": 1}, ttl_s=TTL_S)
    assert await store.claim("k", "fp2", lease_s=30, ttl_s=TTL_S) == Claim("conflict", None, "fp1")


async def test_a_claimed_key_is_not_run_twice(store: Store):
    """Of many concurrent claims of one key, one is claimed and the others see it in flight."""
    claims = await asyncio.gather(
        *(store.claim("k", "fp", lease_s=30, ttl_s=TTL_S) for _ in range(20))
    )
    states = sorted(claim.state for claim in claims)
    assert states == ["claimed"] + ["in_flight"] * 19


async def test_an_expired_lease_is_taken_over(store: Store, clock: Clock):
    """A dead worker's claim is taken over once its lease lapses; the old owner is locked out."""
    old = await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)
    clock.advance(29.9)
    assert (await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)).state == "in_flight"
    clock.advance(0.1)
    new = await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)
    assert new.state == "claimed" and new.token != old.token
    assert not await store.renew("k", lease_s=30, token=old.token)
    assert not await store.release("k", token=old.token)
    assert (await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)).state == "in_flight"


async def test_renewing_a_lease_keeps_the_claim(store: Store, clock: Clock):
    """A long node that renews its lease is not taken over."""
    claim = await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)
    for _ in range(3):
        clock.advance(20)
        assert await store.renew("k", lease_s=30, token=claim.token)
    assert (await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)).state == "in_flight"
    assert not await store.renew("never-claimed", lease_s=30)


async def test_results_expire_after_their_ttl(store: Store, clock: Clock):
    """A stored result replays for ttl_s seconds; after that the key runs again."""
    await store.claim("k", "fp", lease_s=30, ttl_s=100)
    await store.finish("k", "fp", {"output": 1}, ttl_s=100)
    clock.advance(99.9)
    assert (await store.claim("k", "fp", lease_s=30, ttl_s=100)).state == "replay"
    clock.advance(0.1)
    assert (await store.claim("k", "fp2", lease_s=30, ttl_s=100)).state == "claimed"


async def test_release_lets_a_later_run_try_again(store: Store):
    """A released claim can be claimed again, with any params; a finished one is kept."""
    claim = await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)
    assert await store.release("k", token=claim.token)
    assert (await store.claim("k", "fp2", lease_s=30, ttl_s=TTL_S)).state == "claimed"
    await store.release("k")
    await store.claim("done", "fp", lease_s=30, ttl_s=TTL_S)
    await store.finish("done", "fp", {"output": 2}, ttl_s=TTL_S)
    assert not await store.release("done")
    assert (await store.claim("done", "fp", lease_s=30, ttl_s=TTL_S)).state == "replay"


async def test_concurrent_claims_from_processes_yield_one_claimed(store: Store, target: Target):
    """Processes claiming the same keys at the same moments: exactly one runs each."""
    per_key = await asyncio.to_thread(_race_in_processes, target, "claim", T0, 4)
    assert len(per_key) == ROUNDS
    for states in per_key:
        assert sorted(states) == ["claimed", "in_flight", "in_flight", "in_flight"]
    assert (await store.claim("race-0", "fp", lease_s=60, ttl_s=600)).state == "in_flight"


async def test_concurrent_claims_from_threads_yield_one_claimed(target: Target, clock: Clock):
    """Threads, each with its own store and event loop, claiming the same keys: one runs each."""
    barrier = threading.Barrier(4)

    async def claim_all() -> list[str]:
        async with target.open(clock) as store:
            await store.breaker_state("warm-up")
            await asyncio.to_thread(barrier.wait, 10)
            return [
                (await store.claim(f"k{n}", "fp", lease_s=30, ttl_s=TTL_S)).state
                for n in range(ROUNDS)
            ]

    def in_threads() -> list[list[str]]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: asyncio.run(claim_all()), range(4)))

    answers = await asyncio.to_thread(in_threads)
    for states in zip(*answers, strict=True):
        assert sorted(states) == ["claimed", "in_flight", "in_flight", "in_flight"]


# -- circuit breakers -----------------------------------------------------------------------


async def _open_breaker(store: Store, name: str = "github/create_issue") -> None:
    for _ in range(3):
        await store.breaker_record(name, success=False, threshold=3)
    assert (await store.breaker_state(name)).state == "open"


async def test_breaker_opens_after_threshold_consecutive_failures(store: Store, clock: Clock):
    """Closed until `threshold` consecutive failures; a success in between starts the count over."""
    name = "github/create_issue"
    assert await store.breaker_state(name) == BreakerState("closed", 0, None)
    await store.breaker_record(name, success=False, threshold=3)
    await store.breaker_record(name, success=True, threshold=3)
    assert await store.breaker_state(name) == BreakerState("closed", 0, None)
    for failures in (1, 2):
        _, after = await store.breaker_record(name, success=False, threshold=3)
        assert after == BreakerState("closed", failures, None)
    before, after = await store.breaker_record(name, success=False, threshold=3)
    assert before == BreakerState("closed", 2, None)
    assert after == BreakerState("open", 3, T0)


async def test_breakers_are_listed_and_reset_by_hand(store: Store, clock: Clock):
    """Breakers that are not plainly closed are listed by name; a reset closes one."""
    assert await store.breakers() == {}
    for _ in range(3):
        await store.breaker_record("a/x@1", success=False, threshold=3)
    await store.breaker_record("b/y", success=False, threshold=3)
    assert await store.breakers() == {
        "a/x@1": BreakerState("open", 3, T0),
        "b/y": BreakerState("closed", 1, None),
    }
    assert await store.reset_breaker("a/x@1")
    assert not await store.reset_breaker("a/x@1")
    assert await store.breaker_state("a/x@1") == BreakerState("closed", 0, None)
    assert list(await store.breakers()) == ["b/y"]


async def test_an_open_breaker_fails_fast_until_reset(store: Store, clock: Clock):
    """An open breaker refuses every call for reset_ms, then admits a probe."""
    await _open_breaker(store)
    clock.advance(RESET_MS / 1000 - 0.001)
    allowed, before, after = await store.breaker_admit("github/create_issue", reset_ms=RESET_MS)
    assert not allowed and before == after == BreakerState("open", 3, T0)
    await store.breaker_record("github/create_issue", success=False, threshold=3)  # a late one
    assert await store.breaker_state("github/create_issue") == BreakerState("open", 4, T0)
    clock.advance(0.001)
    allowed, before, after = await store.breaker_admit("github/create_issue", reset_ms=RESET_MS)
    assert allowed and before.state == "open" and after == BreakerState("half_open", 4, T0)
    assert (await store.breaker_admit("other/node", reset_ms=RESET_MS))[0]  # one per name


async def test_half_open_admits_exactly_one_probe_among_tasks(store: Store, clock: Clock):
    """Tasks racing through a breaker whose reset has passed: one probe, the rest refused."""
    await _open_breaker(store)
    clock.advance(RESET_MS / 1000)
    answers = await asyncio.gather(
        *(store.breaker_admit("github/create_issue", reset_ms=RESET_MS) for _ in range(20))
    )
    assert sorted(allowed for allowed, _, _ in answers) == [False] * 19 + [True]
    assert (await store.breaker_state("github/create_issue")).state == "half_open"


async def test_half_open_admits_exactly_one_probe_among_processes(
    store: Store, target: Target, clock: Clock
):
    """Processes racing through breakers whose reset has passed: the state is shared, one probe."""
    for n in range(ROUNDS):
        await _open_breaker(store, f"race-{n}")
    per_key = await asyncio.to_thread(
        _race_in_processes, target, "admit", clock.now + RESET_MS / 1000, 4
    )
    for admitted in per_key:
        assert sorted(admitted) == [False, False, False, True]
    assert (await store.breaker_state("race-0")).state == "half_open"


async def test_a_successful_probe_closes_the_breaker(store: Store, clock: Clock):
    """The probe's success closes the breaker and clears its failures."""
    await _open_breaker(store)
    clock.advance(RESET_MS / 1000)
    assert (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]
    before, after = await store.breaker_record("github/create_issue", success=True, threshold=3)
    assert before == BreakerState("half_open", 3, T0)
    assert after == BreakerState("closed", 0, None)
    assert (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]


async def test_a_failed_probe_reopens_the_breaker(store: Store, clock: Clock):
    """The probe's failure re-opens the breaker from now, for another reset_ms."""
    await _open_breaker(store)
    clock.advance(RESET_MS / 1000)
    await store.breaker_admit("github/create_issue", reset_ms=RESET_MS)
    _, after = await store.breaker_record("github/create_issue", success=False, threshold=3)
    assert after == BreakerState("open", 4, clock.now)
    clock.advance(RESET_MS / 1000 - 0.001)
    assert not (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]
    clock.advance(0.001)
    assert (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]


async def test_a_calls_first_and_last_steps_each_do_both_parts_in_one(store: Store, clock: Clock):
    """claim_and_admit claims, and asks the breaker only for a claimed key (a replay, a
    conflict or a key in flight leave a half-open breaker's probe untaken); a refused
    admission still holds the claim. record_and_finish closes the breaker and stores the
    result, which the next claim replays."""
    name = "github/create_issue"
    await _open_breaker(store, name)
    clock.advance(RESET_MS / 1000)  # half-open on the next admission: one probe
    await store.claim("held", "fp", lease_s=30, ttl_s=TTL_S)
    await store.finish("done", "fp", {"output": 1}, ttl_s=TTL_S)
    for key, fp, state in (("held", "fp", "in_flight"), ("done", "fp", "replay"),
                           ("done", "other", "conflict")):  # fmt: skip
        claim, admission = await store.claim_and_admit(
            key, fp, lease_s=30, ttl_s=TTL_S, breaker=name, reset_ms=RESET_MS
        )
        assert claim.state == state and admission is None
    assert (await store.breaker_state(name)).state == "open"  # no probe was taken
    claim, admission = await store.claim_and_admit(
        "k", "fp", lease_s=30, ttl_s=TTL_S, breaker=name, reset_ms=RESET_MS
    )
    assert claim.state == "claimed" and claim.token
    assert admission == (True, BreakerState("open", 3, T0), BreakerState("half_open", 3, T0))
    claim, admission = await store.claim_and_admit(
        "k2", "fp", lease_s=30, ttl_s=TTL_S, breaker=name, reset_ms=RESET_MS
    )
    assert claim.state == "claimed" and admission is not None and not admission[0]
    assert (await store.claim("k2", "fp", lease_s=30, ttl_s=TTL_S)).state == "in_flight"
    before, after = await store.record_and_finish(
        "k", "fp", {"output": {"id": 7}}, ttl_s=TTL_S, breaker=name, threshold=3
    )
    assert before == BreakerState("half_open", 3, T0) and after == BreakerState("closed", 0, None)
    assert await store.breaker_state(name) == BreakerState("closed", 0, None)
    replay = await store.claim("k", "fp", lease_s=30, ttl_s=TTL_S)
    assert replay == Claim("replay", {"output": {"id": 7}}, "fp")


async def test_a_first_step_whose_admission_fails_gives_the_key_back(
    store: Store, target: Target, clock: Clock
):
    """The claim is written, then the breaker's admission fails (SQLite refuses the write;
    on Redis the breaker's hash is corrupt): StoreError, and the key is not left claimed
    for its lease, so the next run claims it at once."""
    name = "github/create_issue"
    await _open_breaker(store, name)
    clock.advance(RESET_MS / 1000)  # the admission writes: open -> half-open
    if target.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(target.where)) as conn:
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON breakers "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            conn.commit()
    else:
        async with redis.asyncio.Redis.from_url(target.where) as client:
            await client.hset(f"{target.prefix}breaker:{name}", "opened_at", "not a time")
    with pytest.raises(StoreError):
        await store.claim_and_admit(
            "k", "fp", lease_s=60, ttl_s=TTL_S, breaker=name, reset_ms=RESET_MS
        )
    assert (await store.claim("k", "fp", lease_s=60, ttl_s=TTL_S)).state == "claimed"


async def test_a_lost_probe_is_replaced_after_reset(store: Store, clock: Clock):
    """A probe whose process died blocks the breaker for reset_ms, then a new probe goes."""
    await _open_breaker(store)
    clock.advance(RESET_MS / 1000)
    assert (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]
    clock.advance(RESET_MS / 1000 - 0.001)
    assert not (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]
    clock.advance(0.001)
    allowed, _, after = await store.breaker_admit("github/create_issue", reset_ms=RESET_MS)
    assert allowed and after.state == "half_open"
    assert not (await store.breaker_admit("github/create_issue", reset_ms=RESET_MS))[0]


# -- keyed state, restarts, opening ---------------------------------------------------------


async def test_add_seen_returns_only_new_members(store: Store, clock: Clock):
    """add_seen answers the members not seen before, once each, in order; expiry is per member."""
    assert await store.add_seen("t", ["a", "b", "a"], ttl_s=10) == ["a", "b"]
    clock.advance(5)
    assert await store.add_seen("t", ["b", "c"], ttl_s=10) == ["c"]
    clock.advance(5)  # "a" was last seen 10 s ago, "b" and "c" 5 s ago
    assert await store.add_seen("t", ["a", "b", "c"], ttl_s=10) == ["a"]
    assert await store.add_seen("forever", ["x"]) == ["x"]
    clock.advance(10**6)
    assert await store.add_seen("forever", ["x", "y"]) == ["y"]
    assert await store.add_seen("t", []) == []


async def test_add_seen_is_atomic_among_tasks(store: Store):
    """Concurrent add_seen calls with overlapping members report each member new exactly once."""
    batches = [[str(n) for n in range(start, start + 50)] for start in range(0, 100, 10)]
    answers = await asyncio.gather(*(store.add_seen("t", batch, ttl_s=TTL_S) for batch in batches))
    reported = [member for answer in answers for member in answer]
    assert sorted(reported, key=int) == [str(n) for n in range(140)]


async def test_unseen_reads_without_recording(store: Store, clock: Clock):
    """unseen answers the members not in the set (or expired there), in order, once each,
    and records nothing: a poll that dies before it commits loses no item."""
    await store.add_seen("t", ["a", "b"], ttl_s=10)
    assert await store.unseen("t", ["c", "a", "c", "d", "b"]) == ["c", "d"]
    assert await store.unseen("t", ["c"]) == ["c"]  # still not recorded
    assert await store.unseen("other", ["a"]) == ["a"]
    assert await store.unseen("t", []) == []
    clock.advance(10)
    assert await store.unseen("t", ["a", "b"]) == ["a", "b"]
    await store.add_seen("forever", ["x"])
    clock.advance(10**6)
    assert await store.unseen("forever", ["x", "y"]) == ["y"]


async def test_json_values_are_kept_and_expire(store: Store, clock: Clock):
    """put_json keeps a value until replaced, or for ttl_s seconds."""
    assert await store.get_json("cursor") is None
    await store.put_json("cursor", {"updated_at": "2024-01-01", "ids": [1, 2]})
    await store.put_json("short", [1], ttl_s=10)
    clock.advance(9.9)
    assert await store.get_json("short") == [1]
    clock.advance(0.1)
    assert await store.get_json("short") is None
    await store.put_json("short", "again")  # replaced without a ttl: kept
    clock.advance(10**6)
    assert await store.get_json("short") == "again"
    assert await store.get_json("cursor") == {"updated_at": "2024-01-01", "ids": [1, 2]}


async def test_state_survives_a_restart(store: Store, target: Target, clock: Clock):
    """Closing and reopening the store (same file, same Redis) keeps every record."""
    await store.claim("done", "fp", lease_s=30, ttl_s=TTL_S)
    await store.finish("done", "fp", {"output": "kept"}, ttl_s=TTL_S)
    await store.claim("running", "fp", lease_s=30, ttl_s=TTL_S)
    await _open_breaker(store)
    await store.put_json("cursor", 42)
    await store.add_seen("t", ["a"])
    await store.close()
    async with target.open(clock) as reopened:
        replay = await reopened.claim("done", "fp", lease_s=30, ttl_s=TTL_S)
        assert replay == Claim("replay", {"output": "kept"}, "fp")
        assert (await reopened.claim("running", "fp", lease_s=30, ttl_s=TTL_S)).state == "in_flight"
        assert await reopened.breaker_state("github/create_issue") == BreakerState("open", 3, T0)
        assert await reopened.get_json("cursor") == 42
        assert await reopened.add_seen("t", ["a", "b"]) == ["b"]


async def test_bad_arguments_are_refused(store: Store):
    """Non-positive leases, TTLs, thresholds and reset times raise ConfigError naming them."""
    with pytest.raises(ConfigError, match="lease_s"):
        await store.claim("k", "fp", lease_s=0, ttl_s=TTL_S)
    with pytest.raises(ConfigError, match="ttl_s"):
        await store.finish("k", "fp", {}, ttl_s=-1)
    with pytest.raises(ConfigError, match="threshold"):
        await store.breaker_record("b", success=False, threshold=0)
    with pytest.raises(ConfigError, match="reset_ms"):
        await store.breaker_admit("b", reset_ms=0)


async def test_a_closed_store_says_so(target: Target, clock: Clock):
    """Using a store after close raises StoreError; closing twice is fine."""
    store = target.open(clock)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_json("k")


async def test_sqlite_store_uses_wal_in_the_given_file(tmp_path: Path):
    """The SQLite store is one WAL-mode file that other processes can open."""
    async with SqliteStore(tmp_path / "corral.db") as store:
        await store.put_json("k", 1)
        with contextlib.closing(sqlite3.connect(tmp_path / "corral.db")) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_redis_errors_surface_as_store_errors(tmp_path: Path):
    """A Redis that went away raises StoreError naming it, not a redis-py exception."""
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    async with RedisStore(url) as store:
        with pytest.raises(StoreError, match=r"Redis at redis://:\*\*\*@127\.0\.0\.1") as info:
            await store.breaker_state("b")
    assert "secret" not in str(info.value)


# Run in a network namespace of its own: a Redis on its loopback, which is taken down
# while every client is connected, so what they sent is never acknowledged.
_CUT_OFF = """
import asyncio, json, subprocess, sys, time
from corral.runtime.store import RedisStore, StoreError
from corral.service.queue import QueueError
from corral.service.queue._bullmq import BullmqQueue
from corral.service.records import RecordsError
from corral.service.records._redis import RedisRecords

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
server = subprocess.Popen(["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", ""],
                          stdout=subprocess.DEVNULL)

async def timed(call):
    began = time.monotonic()
    try:
        await call
        return "answered", time.monotonic() - began
    except (StoreError, RecordsError, QueueError) as exc:
        return type(exc).__name__ + ": " + str(exc), time.monotonic() - began

async def main():
    url = "redis://127.0.0.1:6379/0"
    store, records = RedisStore(url), RedisRecords(url)
    queue = BullmqQueue(url, lease_s=30, max_reclaims=2)
    for _ in range(50):
        try:
            await records.ping()
            break
        except RecordsError:
            await asyncio.sleep(0.1)
    await asyncio.gather(store.breaker_state("b"), queue.ping())  # every client connected
    subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
    cut = await asyncio.wait_for(asyncio.gather(
        timed(store.breaker_state("b")), timed(records.ping()), timed(queue.ping())), 60)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    healed = await asyncio.wait_for(asyncio.gather(
        timed(store.breaker_state("b")), timed(records.ping()), timed(queue.ping())), 30)
    for client in (store, records, queue):
        await client.close()
    print(json.dumps({"cut": cut, "healed": healed}))

try:
    asyncio.run(main())
finally:
    server.terminate()
    server.wait()
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not (shutil.which("unshare") and shutil.which("ip") and shutil.which("redis-server")),
    reason="needs unshare(1), ip(8) and redis-server for a Redis in a network namespace",
)
def test_a_redis_cut_off_mid_call_fails_every_client_within_its_time_out(tmp_path: Path):
    """No per-command time-out, but a Redis that stops acknowledging (its network gone) is
    an error after REDIS_TIMEOUT_S (the kernel's TCP_USER_TIMEOUT) and redis-py's reconnect
    attempts, on the store, the records and the queue alike (not a hang), and each answers
    again once the network is back."""
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _CUT_OFF],
        capture_output=True, text=True, timeout=100, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    kinds = ("StoreError", "RecordsError", "QueueError")
    for (error, took), kind in zip(outcome["cut"], kinds, strict=True):
        assert error.startswith(f"{kind}: Redis at redis://127.0.0.1:6379/0: "), error
        # the kernel's time-out, then redis-py's two reconnects (9.6 s here)
        assert REDIS_TIMEOUT_S <= took < REDIS_TIMEOUT_S + 3 * REDIS_CONNECT_TIMEOUT_S + 2, took
    assert [answer for answer, _ in outcome["healed"]] == ["answered"] * 3


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_a_redis_on_a_unix_socket_serves_every_client(tmp_path: Path):
    """CORRAL_REDIS_URL may name a Unix socket (unix://, any case): the store, the records
    and the queue all work on it (TCP's keepalive options are not given to it)."""
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        async with RedisStore(f"UNIX://{sock}") as store:
            await store.put_json("k", 1)
            assert await store.get_json("k") == 1
        records = RedisRecords(f"unix://{sock}")
        queue = BullmqQueue(f"unix://{sock}", lease_s=30, max_reclaims=2)
        try:
            await records.ping()
            await queue.ping()
        finally:
            await records.close()
            await queue.close()
    finally:
        stop(server)


async def test_open_store_defaults_to_sqlite_in_the_state_dir(tmp_path: Path, clean_env):
    """Without CORRAL_REDIS_URL the store is corral.db in CORRAL_STATE_DIR, created if missing."""
    clean_env.setenv("CORRAL_STATE_DIR", str(tmp_path / "state" / "dir"))
    async with open_store(load_settings()) as store:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "state" / "dir" / "corral.db"
        await store.put_json("k", 1)


async def test_open_store_uses_redis_when_configured(redis_url: str, clean_env):
    """With CORRAL_REDIS_URL the store is on that Redis, keys under corral:."""
    clean_env.setenv("CORRAL_REDIS_URL", redis_url)
    async with open_store(load_settings()) as store:
        assert isinstance(store, RedisStore) and store.prefix == "corral:"
        assert await store.breaker_state("never-used") == BreakerState("closed", 0, None)


async def test_open_store_refuses_an_unusable_state_dir(tmp_path: Path, clean_env):
    """A CORRAL_STATE_DIR that cannot hold a database is a one-line ConfigError naming it."""
    (tmp_path / "file").write_text("")
    clean_env.setenv("CORRAL_STATE_DIR", str(tmp_path / "file" / "state"))
    with pytest.raises(ConfigError) as info:
        open_store(load_settings())
    message = str(info.value)
    assert "CORRAL_STATE_DIR" in message and "writable directory" in message
    assert "\n" not in message


async def test_open_store_refuses_an_unreachable_redis(clean_env):
    """A CORRAL_REDIS_URL nobody answers at is a one-line ConfigError naming it."""
    clean_env.setenv("CORRAL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ConfigError) as info:
        open_store(load_settings())
    message = str(info.value)
    assert "CORRAL_REDIS_URL" in message and "does not answer" in message
    assert "\n" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://[bad"])
async def test_open_store_refuses_a_malformed_redis_url(url: str, clean_env):
    """A CORRAL_REDIS_URL that is not a Redis URL is a one-line ConfigError naming it."""
    clean_env.setenv("CORRAL_REDIS_URL", url)
    with pytest.raises(ConfigError, match="CORRAL_REDIS_URL"):
        open_store(load_settings())


def test_the_runtime_facade_exports_the_store():
    """corral.runtime exports exactly its public names."""
    import corral.runtime

    assert set(corral.runtime.__all__) >= {
        "Store", "SqliteStore", "RedisStore", "open_store", "Claim", "BreakerState", "StoreError",
    }  # fmt: skip
    assert all(hasattr(corral.runtime, name) for name in corral.runtime.__all__)
