"""What only the worker backend does: reuse, replacement, recycling, pooling, and no state
crossing from one execution to the next."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import _corral_cgroups, cgroup_pids

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings

SLEEP = (
    "import time\ndef run(params, context):\n    time.sleep(params.get('s', 30))\n    return 1\n"
)


def worker_pids() -> set[int]:
    """The processes in this host's corral cgroups: with the worker backend, its workers."""
    pids = set()
    for cgroup in _corral_cgroups():
        pids.update(cgroup_pids(cgroup))
    return pids


@contextlib.contextmanager
def one_worker(
    env: pytest.MonkeyPatch, max_memory_mb: int = 64, **settings: str
) -> Iterator[NodeSandbox]:
    """A worker sandbox with a pool of one (consecutive executions share a worker)."""
    for name, value in {"CORRAL_WORKER_POOL_SIZE": "1", **settings}.items():
        env.setenv(name, value)
    limits = Limits(max_memory_mb=max_memory_mb)
    with NodeSandbox(executor="worker", limits=limits, settings=load_settings()) as sandbox:
        yield sandbox


@pytest.fixture
def workers(clean_env) -> Iterator[NodeSandbox]:
    """A worker sandbox with a pool of one."""
    with one_worker(clean_env) as sandbox:
        yield sandbox


@pytest.mark.limits
def test_executions_reuse_one_worker(workers):
    """Back-to-back executions run in the same long-lived worker process."""
    code = "def run(params, context):\n    return params\n"
    workers.execute_sync(code, params={"n": 1})
    first = worker_pids()
    for n in range(5):
        assert workers.execute_sync(code, params={"n": n}).output == {"n": n}
    assert worker_pids() == first and len(first) == 1


def test_answers_racing_heartbeats_keep_the_worker(workers):
    """Executions that end before, around and after a heartbeat falls due are each answered
    once, with their logs, and keep the worker (a frame after an answer would retire it)."""
    code = (
        "import time\n"
        "def run(params, context):\n"
        "    time.sleep(params['s'])\n"
        "    log('done')\n"
        "    return params['n']\n"
    )
    limits = Limits(heartbeat_interval_ms=25, heartbeat_timeout_ms=2000)
    workers.execute_sync(code, params={"n": 0, "s": 0}, limits=limits)
    first = worker_pids()
    for n in range(80):  # ends before, at and after a beat
        params = {"n": n, "s": 0.004 * (n % 10)}
        result = workers.execute_sync(code, params=params, limits=limits)
        assert result.output == n and [entry.message for entry in result.logs] == ["done"]
    assert worker_pids() == first and len(first) == 1


@pytest.mark.limits
def test_worker_stops_a_spin_itself_and_survives(workers):
    """A CPU limit in pure Python is stopped by the worker's control thread; the worker lives."""
    workers.execute_sync("def run(params, context):\n    return 1\n")
    before = worker_pids()
    spin = "def run(params, context):\n    while True:\n        pass\n"
    with pytest.raises(corral.CpuLimitExceeded) as caught:
        workers.execute_sync(spin, limits=Limits(max_cpu_ms=300))
    assert 300 <= caught.value.usage.cpu_ms <= 600
    assert workers.execute_sync("def run(params, context):\n    return 2\n").output == 2
    assert worker_pids() == before


@pytest.mark.limits
def test_an_execution_that_returns_just_past_its_cpu_limit_is_not_a_success(workers):
    """Code that spins just past its CPU limit and returns before the control thread's next
    look is still cpu_limit (the answer checks the limits once more), and the worker lives."""
    code = (
        "import time\n"
        "def run(params, context):\n"
        "    start = time.process_time()\n"
        "    while time.process_time() - start < params['s']:\n"
        "        pass\n"
        "    return 1\n"
    )
    workers.execute_sync("def run(params, context):\n    return 0\n")
    before = worker_pids()
    for _ in range(15):
        with pytest.raises(corral.CpuLimitExceeded):
            workers.execute_sync(code, params={"s": 0.033}, limits=Limits(max_cpu_ms=30))
    assert workers.execute_sync("def run(params, context):\n    return 2\n").output == 2
    assert worker_pids() == before


@pytest.mark.limits
def test_worker_killed_mid_execution_is_replaced(workers):
    """A worker killed from outside fails its execution as sandbox_crash and is replaced."""

    workers.execute_sync("def run(params, context):\n    return 1\n")  # the worker is up

    async def scenario() -> None:
        task = asyncio.ensure_future(workers.execute(SLEEP, timeout_ms=20_000))
        await asyncio.sleep(0.3)
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(corral.SandboxCrash):
            await task
        assert (await workers.execute("def run(params, context):\n    return 3\n")).output == 3
        assert pid not in worker_pids()

    asyncio.run(scenario())


@pytest.mark.limits
def test_gil_holding_loop_gets_the_worker_replaced(workers):
    """A regex backtracking in C cannot be stopped cooperatively: the host kills the worker."""
    workers.execute_sync("def run(params, context):\n    return 1\n")
    (before,) = worker_pids()
    code = "import re\ndef run(params, context):\n    return re.match(r'(a+)+$', 'a' * 64 + 'b')\n"
    limits = Limits(heartbeat_interval_ms=50, heartbeat_timeout_ms=300)
    with pytest.raises(corral.HeartbeatTimeout):
        workers.execute_sync(code, limits=limits, timeout_ms=20_000)
    assert workers.execute_sync("def run(params, context):\n    return 4\n").output == 4
    assert before not in worker_pids()


def test_worker_recycled_after_max_executions(clean_env):
    """After CORRAL_WORKER_MAX_EXECUTIONS executions a worker is replaced by a fresh one."""
    code = "def run(params, context):\n    return 1\n"
    with one_worker(clean_env, CORRAL_WORKER_MAX_EXECUTIONS="3") as sandbox:
        sandbox.execute_sync(code)
        first = worker_pids()
        sandbox.execute_sync(code)
        assert worker_pids() == first
        sandbox.execute_sync(code)  # the third: the worker retires after it
        sandbox.execute_sync(code)
        assert worker_pids().isdisjoint(first)


def _cgroup_descriptors() -> int:
    """This host's open descriptors on cgroup files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/sys/fs/cgroup/")
    return count


def test_recycled_workers_leave_no_cgroup_file_open(clean_env):
    """A worker's cgroup files are held open for its executions and closed when it retires:
    workers replaced again and again hold no more of them than the first did."""
    code = "def run(params, context):\n    return 1\n"
    with one_worker(clean_env, CORRAL_WORKER_MAX_EXECUTIONS="2") as sandbox:
        sandbox.execute_sync(code)
        backend = sandbox._backend
        backend.reaper.drain()
        held = _cgroup_descriptors()
        assert held >= 2  # its memory and CPU accounting files at least
        for _ in range(8):  # four workers retire
            sandbox.execute_sync(code)
        backend.reaper.drain()
        assert _cgroup_descriptors() == held
    assert _cgroup_descriptors() == 0


@pytest.mark.limits
def test_worker_recycled_when_its_memory_grows(clean_env):
    """A worker whose peak memory grew past CORRAL_WORKER_MAX_MEMORY_MB is replaced."""
    hog = "def run(params, context):\n    data = 'x' * (32 << 20)\n    return len(data)\n"
    with one_worker(clean_env, 128, CORRAL_WORKER_MAX_MEMORY_MB="8") as sandbox:
        sandbox.execute_sync("def run(params, context):\n    return 1\n")
        first = worker_pids()
        assert sandbox.execute_sync(hog).output == 32 << 20
        sandbox.execute_sync("def run(params, context):\n    return 1\n")
        assert worker_pids().isdisjoint(first)


@pytest.mark.parametrize(
    ("store", "probe"),
    [
        # A module attribute (refused) never shows up later.
        ("import json\ndef run(params, context):\n    try:\n        json.leak = 1\n"
         "    except Exception:\n        pass\n    return 1\n",
         "import json\ndef run(params, context):\n    return hasattr(json, 'leak')\n"),
        # A default argument is fresh with every execution.
        ("def run(params, context, seen=[]):\n    seen.append(1)\n    return len(seen)\n",
         "def run(params, context, seen=[]):\n    seen.append(1)\n    return len(seen) > 1\n"),
        # A cache belongs to the execution that made it.
        ("import functools\n@functools.lru_cache\ndef f(x):\n    return x\n"
         "def run(params, context):\n    f(1)\n    return f.cache_info().currsize\n",
         "import functools\n@functools.lru_cache\ndef f(x):\n    return x\n"
         "def run(params, context):\n    return f.cache_info().currsize > 0\n"),
        # The decimal context of the execution thread (its flags, here) is reset.
        ("import decimal\ndef run(params, context):\n"
         "    return str(decimal.Decimal(1) / decimal.Decimal(3))\n",
         "import decimal\ndef run(params, context):\n"
         "    return decimal.getcontext().flags[decimal.Inexact]\n"),
        # A container an allowed module shows cannot be filled.
        ("import hashlib\ndef run(params, context):\n    try:\n"
         "        hashlib.algorithms_available.add('leak')\n    except Exception:\n"
         "        pass\n    return 1\n",
         "import hashlib\ndef run(params, context):\n"
         "    return 'leak' in hashlib.algorithms_available\n"),
        # A class attribute of an allowed type cannot be set.
        ("import collections\ndef run(params, context):\n    try:\n"
         "        collections.OrderedDict.leak = 1\n    except Exception:\n        pass\n"
         "    return 1\n",
         "import collections\ndef run(params, context):\n"
         "    return hasattr(collections.OrderedDict, 'leak')\n"),
    ],
    ids=["module-attribute", "default-argument", "lru-cache", "decimal-context",
         "module-container", "class-attribute"],
)  # fmt: skip
def test_no_state_crosses_executions(workers, store, probe):
    """What one execution stores is not visible to the next one in the same worker."""
    with contextlib.suppress(corral.PolicyViolation):  # a refused write ends as one
        workers.execute_sync(store)
    pids = worker_pids()
    assert workers.execute_sync(probe).output is False
    assert worker_pids() == pids  # the same worker answered both


def test_pool_runs_at_most_its_size_in_parallel_and_in_order(clean_env):
    """With a pool of 2, six executions run two at a time, started in the order they came."""
    clean_env.setenv("CORRAL_WORKER_POOL_SIZE", "2")
    code = (
        "import time\ndef run(params, context):\n    started = time.time()\n"
        "    time.sleep(0.25)\n    return [params['n'], started, time.time()]\n"
    )

    async def scenario(sandbox: NodeSandbox) -> list[list[float]]:
        tasks = []
        for n in range(6):
            tasks.append(asyncio.ensure_future(sandbox.execute(code, params={"n": n})))
            # A definite order of arrival; the first two 0.1 s apart, so that the two workers
            # free up (and the waiting ones start) that far apart, well over any jitter.
            await asyncio.sleep(0.1 if n == 0 else 0.01)
        return [result.output for result in await asyncio.gather(*tasks)]

    with NodeSandbox(executor="worker", limits=Limits(max_memory_mb=64),
                     settings=load_settings()) as sandbox:  # fmt: skip
        sandbox.start()
        runs = asyncio.run(scenario(sandbox))
    for _, started, _ in runs:
        overlapping = sum(1 for _, s, e in runs if s <= started < e)
        assert overlapping <= 2
    starts = [started for _, started, _ in runs]
    assert starts[2:] == sorted(starts[2:])  # the waiting ones went in their order of arrival
    assert max(e for *_, e in runs) - min(starts) >= 3 * 0.25


def test_cancelled_wait_leaks_no_worker(workers):
    """An execution cancelled while it waits for a worker leaves the pool whole."""

    async def scenario() -> int:
        busy = asyncio.ensure_future(workers.execute(SLEEP, params={"s": 0.4}))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(workers.execute(SLEEP, params={"s": 0}))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await busy
        result = await asyncio.wait_for(
            workers.execute("def run(params, context):\n    return 5\n"), timeout=5
        )
        return result.output

    assert asyncio.run(scenario()) == 5


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SANDBOX_EXECUTOR": "Worker_Thread"}, "worker"),
        ({"WORKER_SANDBOX_ENABLED": "true"}, "worker"),
        ({"WORKER_SANDBOX_ENABLED": "true", "SANDBOX_EXECUTOR": "proc"}, "process"),
        ({}, "process"),
    ],
)
def test_selection_from_the_environment(clean_env, env, expected):
    """SANDBOX_EXECUTOR wins, else WORKER_SANDBOX_ENABLED picks worker, else process."""
    for name, value in env.items():
        clean_env.setenv(name, value)
    with NodeSandbox(limits=Limits(max_memory_mb=64), settings=load_settings()) as sandbox:
        assert sandbox.executor == expected
        result = sandbox.execute_sync("def run(params, context):\n    return 1\n")
        assert result.executor == expected


def test_cli_executor_flag_overrides_the_environment():
    """`corral run --executor worker` runs on a worker even when the env says process."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "hello.py")
    done = subprocess.run(
        [sys.executable, "-m", "corral", "run", path, "--executor", "worker", "--json",
         "--max-memory-mb", "64"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SANDBOX_EXECUTOR": "process"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["executor"] == "worker"


@pytest.mark.limits
def test_close_with_executions_in_flight_leaves_no_worker():
    """close() while workers are busy aborts them and leaves no process behind."""
    sandbox = NodeSandbox(executor="worker", limits=Limits(max_memory_mb=64))

    async def scenario() -> list[BaseException]:
        tasks = [asyncio.ensure_future(sandbox.execute(SLEEP)) for _ in range(3)]
        await asyncio.sleep(0.5)
        sandbox.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, corral.Aborted) for outcome in outcomes), outcomes
    assert time.monotonic() - started < 10


@pytest.mark.limits
@pytest.mark.parametrize("executor", ["worker", "process"])
def test_close_while_executions_wait_for_a_first_spare(executor):
    """close() before the zygote's first spares arrive wakes every waiting execution at
    once (the zygote's end used to wake one, and the others waited 30 s)."""
    sandbox = NodeSandbox(executor=executor, limits=Limits(max_memory_mb=64))

    async def scenario() -> list[BaseException]:
        tasks = [asyncio.ensure_future(sandbox.execute(SLEEP)) for _ in range(3)]
        await asyncio.sleep(0.01)  # the zygote is still starting: all three wait for spares
        sandbox.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, corral.Aborted) for outcome in outcomes), outcomes
    assert time.monotonic() - started < 10


def test_sleep_past_the_time_out_is_cut_short(workers):
    """A worker stops an execution sleeping past its time-out and lives on."""
    workers.execute_sync("def run(params, context):\n    return 1\n")
    before = worker_pids()
    with pytest.raises(corral.ExecutionTimeout):
        workers.execute_sync(SLEEP, timeout_ms=300)
    assert workers.execute_sync("def run(params, context):\n    return 6\n").output == 6
    assert worker_pids() == before


@pytest.mark.parametrize(
    ("store", "probe", "expected"),
    [
        # A generator left in a cycle used to restore its precision-2 context in the next run.
        ("import decimal\ndef gen(box):\n"
         "    with decimal.localcontext(decimal.Context(prec=28)):\n        yield 1\n"
         "def run(params, context):\n"
         "    with decimal.localcontext(decimal.Context(prec=2)):\n"
         "        box = []\n        g = gen(box)\n        box.append(g)\n        next(g)\n"
         "    return 1\n",
         "import decimal\ndef run(params, context):\n"
         "    junk = [[i] for i in range(999)]\n"
         "    return str(decimal.Decimal('1234.56') * decimal.Decimal('1.19'))\n",
         "1469.1264"),
        # ...or tripped the policy in the next run from its finally block.
        ("def gen(box):\n    try:\n        yield 1\n    finally:\n"
         "        getattr(box, '_secret', None)\n"
         "def run(params, context):\n    box = []\n    g = gen(box)\n    box.append(g)\n"
         "    next(g)\n    return 1\n",
         "def run(params, context):\n    junk = [[i] for i in range(999)]\n    return 'clean'\n",
         "clean"),
    ],
    ids=["decimal-context", "tripwire"],
)  # fmt: skip
def test_leftover_finalizers_run_within_their_own_execution(workers, store, probe, expected):
    """What an execution leaves in cycles is finalized before its answer, not in the next."""
    with contextlib.suppress(corral.PolicyViolation):
        workers.execute_sync(store)
    assert workers.execute_sync(probe).output == expected


#: Finalizers that leave new cycles each time they run: garbage collection after the
#: execution never settles, so they would run in the next executions, with this one's
#: `log` and `http` and on the shared execution thread.
_SELF_RENEWING_FINALIZERS = """
import decimal
def chain(depth):
    def gen():
        try:
            yield 1
        finally:
            decimal.getcontext().clear_traps()
            chain(depth + 1)
    g = gen()
    next(g)
    holder = [g]
    holder.append(holder)
def run(params, context):
    chain(1)
    return 'A finished'
"""


def test_leftovers_that_never_settle_retire_the_worker(workers):
    """An execution whose finalizers keep making garbage gets its worker replaced: the next
    execution sees none of its code run (no log line of A's, decimal traps intact)."""
    assert workers.execute_sync(_SELF_RENEWING_FINALIZERS).output == "A finished"
    first = worker_pids()
    probe = (
        "import decimal\ndef run(params, context):\n    junk = [[i] for i in range(999)]\n"
        "    try:\n        return str(decimal.Decimal(1) / decimal.Decimal(0))\n"
        "    except decimal.DivisionByZero:\n        return 'trapped'\n"
    )
    assert workers.execute_sync(probe).output == "trapped"
    assert worker_pids() != first


def test_an_executions_capabilities_close_when_it_answers(workers):
    """A finalizer of A's that runs after A answered cannot log or send requests."""
    leftover = (
        "def gen():\n    try:\n        yield 1\n    finally:\n"
        "        log('left over from A')\n"
        "def run(params, context):\n    g = gen()\n    next(g)\n    box = [g]\n"
        "    box.append(box)\n    return 'A finished'\n"
    )
    result = workers.execute_sync(leftover)
    assert result.output == "A finished" and result.logs == []
    probe = "def run(params, context):\n    junk = [[i] for i in range(999)]\n    return 'B'\n"
    result = workers.execute_sync(probe)
    assert result.output == "B" and result.logs == []


def test_a_leftover_hung_on_the_params_is_finalized_within_its_execution(workers):
    """A generator kept alive through the request's params has its `finally` run before
    the answer (charged to its own execution), not in the next one."""
    leftover = (
        "import time\ndef run(params, context):\n    def g():\n        try:\n"
        "            yield 1\n        finally:\n            started = time.monotonic()\n"
        "            while time.monotonic() - started < 2.0:\n                pass\n"
        "    x = g()\n    next(x)\n    params['keep'] = x\n    return 'left'\n"
    )
    assert workers.execute_sync(leftover, params={}).output == "left"
    started = time.monotonic()
    assert workers.execute_sync("def run(params, context):\n    return 'B'\n").output == "B"
    assert time.monotonic() - started < 1.2  # the 2 s finalizer ran in its own execution


def test_cached_stdlib_functions_keep_no_history(workers):
    """urllib.parse.urlsplit's cache is neither visible nor kept from one execution to the next."""
    workers.execute_sync(
        "import urllib.parse\ndef run(params, context):\n"
        "    return urllib.parse.urlparse('https://tenant-b.example/?token=s3cr3t').netloc\n"
    )
    probe = (
        "import urllib.parse\ndef run(params, context):\n"
        "    return hasattr(urllib.parse.urlsplit, 'cache_info')\n"
    )
    assert workers.execute_sync(probe).output is False


def test_wait_cancelled_after_hand_over_leaves_the_pool_whole(workers):
    """A waiter cancelled between being handed a worker and resuming gives the worker on."""

    async def scenario() -> int:
        busy = asyncio.ensure_future(workers.execute(SLEEP, params={"s": 0.3}))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(workers.execute(SLEEP, params={"s": 0}))
        await asyncio.sleep(0.05)
        busy.add_done_callback(lambda _: waiting.cancel())  # after the hand-over, before resume
        await busy
        with pytest.raises(asyncio.CancelledError):
            await waiting
        quick = workers.execute("def run(params, context):\n    return 7\n")
        return (await asyncio.wait_for(quick, timeout=5)).output

    assert asyncio.run(scenario()) == 7


def test_waiter_on_a_closed_loop_is_skipped(workers):
    """A waiter whose event loop was closed does not break the execution that frees a worker."""
    import threading

    def abandon() -> None:
        loop = asyncio.new_event_loop()
        # The abandoned task is the point: asyncio's "destroyed but pending" note is not news.
        loop.set_exception_handler(lambda loop, context: None)
        task = loop.create_task(workers.execute(SLEEP, params={"s": 0}))
        loop.run_until_complete(asyncio.sleep(0.2))  # the task now waits in the pool
        loop.close()  # with the task still waiting
        del task

    async def scenario() -> int:
        busy = asyncio.ensure_future(workers.execute(SLEEP, params={"s": 0.6}))
        await asyncio.sleep(0.1)
        thread = threading.Thread(target=abandon)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert (await busy).output == 1
        quick = workers.execute("def run(params, context):\n    return 8\n")
        return (await asyncio.wait_for(quick, timeout=5)).output

    assert asyncio.run(scenario()) == 8


@pytest.mark.limits
def test_peak_memory_is_per_execution(clean_env):
    """A worker's second execution reports its own peak, not the larger one of the first
    (cgroup v1 resets the peak; v2 resets memory.peak, or on kernels that cannot, such as
    6.1, falls back to the worker's resident high-water mark)."""
    hoard = "def run(params, context):\n    a = 'x' * (params['mb'] << 20)\n    return len(a)\n"
    with one_worker(clean_env, max_memory_mb=256) as sandbox:
        big = sandbox.execute_sync(hoard, params={"mb": 96})
        small = sandbox.execute_sync(hoard, params={"mb": 8})
    assert big.usage.peak_memory_bytes >= 90 << 20, big.usage
    assert 7 << 20 <= small.usage.peak_memory_bytes <= 32 << 20, small.usage
