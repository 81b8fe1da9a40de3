"""`corral stack`: the api, a worker and the scheduler as supervised child processes.

children   each `python -m corral <command>` in a process group of its own, its stderr
           forwarded line by line with its name in front
ready      once the API's /readyz passes, the worker's heartbeat and the scheduler's
           leader note are in the records, and all three see the queue and records the
           stack sees: then one line, `corral stack: ready …`
crashes    a child that exits is restarted after a backoff (0.5 s doubling to 30 s, with
           jitter; back to 0.5 s after a minute of running) and the stack says so
rotation   with CORRAL_KEY_ROTATION_INTERVAL_S, `corral rotate-keys` runs that often
stopping   SIGTERM or Ctrl-C: SIGTERM to every child's group, CORRAL_WORKER_GRACE_S + 10 s
           to exit, then SIGKILL; nothing is left behind
metrics    the children write their counters to one directory of the stack's (Prometheus'
           multiprocess mode), so the API's /metrics holds the worker's and scheduler's too
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from corral.service._deployment import describe
from corral.service._metrics import MULTIPROC_ENV
from corral.service.records import RecordsError, open_records

if TYPE_CHECKING:
    from corral.config import Settings

logger = logging.getLogger("corral.stack")

CHILDREN = ("api", "worker", "scheduler")
BACKOFF_S = (0.5, 30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long starts its backoff over
READY_POLL_S = 0.2
READY_ASK_S = 10.0  # the API's /readyz answers within 5 s, its checks' time-out
KILL_AFTER_GRACE_S = 10.0  # a child still running this long past the grace period is killed
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass
class Child:
    """One supervised process."""

    name: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    url: str | None = None  # the API's, once it says where it listens
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None


class Stack:
    """Supervises CHILDREN until stopped."""

    def __init__(self, settings: Settings, metrics_dir: str) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.children = {name: Child(name) for name in CHILDREN}
        self.stopping = False
        self.ready = asyncio.Event()

    def _env(self, name: str) -> dict[str, str]:
        env = {**os.environ, MULTIPROC_ENV: self.metrics_dir}
        if name == "api":  # the stack runs a worker of its own
            env.setdefault("ENABLE_INLINE_WORKER", "false")
        return env

    async def serve(self, stop: asyncio.Event) -> None:
        """Run the children until `stop` is set, then stop them all."""
        view = describe(self.settings)
        logger.info("corral stack: starting %s on %s", ", ".join(CHILDREN), view)
        tasks = [asyncio.create_task(self._supervise(child)) for child in self.children.values()]
        tasks.append(asyncio.create_task(self._announce_ready(view)))
        if self.settings.key_rotation_interval_s:
            tasks.append(asyncio.create_task(self._rotate_keys(stop)))
        try:
            await stop.wait()
        finally:
            self.stopping = True
            await self._stop_children()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        logger.info("corral stack: stopped")

    async def _spawn(self, child: Child) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral", child.name,
            env=self._env(child.name), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    async def _supervise(self, child: Child) -> None:
        delay = BACKOFF_S[0]
        while not self.stopping:
            started = time.monotonic()
            child.process = await self._spawn(child)
            child.started.set()
            forward = asyncio.create_task(self._forward(child))
            status = await child.process.wait()
            # Its stderr may stay open in a grandchild: forward what is left, briefly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(forward), 1.0)
            forward.cancel()
            if self.stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                delay = BACKOFF_S[0]
            wait = delay * random.uniform(0.8, 1.2)
            child.restarts += 1
            child.url = None
            logger.warning(
                "corral stack: %s exited with status %s; restarting it in %.1f s (restart %d)",
                child.name, status, wait, child.restarts,
            )  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _forward(self, child: Child) -> None:
        """Pass the child's stderr on, each line under its name; note the API's address."""
        assert child.process is not None and child.process.stderr is not None
        async for raw in child.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if child.name == "api" and (match := _LISTENING.search(line)):
                child.url = match.group(1)
            print(f"[{child.name}] {line}", file=sys.stderr, flush=True)

    async def _announce_ready(self, view: str) -> None:
        """Say `ready` once every child is up and sees what the stack sees."""
        while True:
            problems = await self.check(view)
            if not problems:
                api = self.children["api"].url
                logger.info("corral stack: ready: api %s, queue and records %s", api, view)
                self.ready.set()
                return
            await asyncio.sleep(READY_POLL_S)

    async def check(self, view: str) -> list[str]:
        """What keeps the stack from being ready (empty: nothing)."""
        problems: list[str] = []
        api = self.children["api"]
        if api.url is None:
            problems.append("the api has not said where it listens")
        else:
            headers = {}
            if self.settings.api_token is not None:
                headers["authorization"] = f"Bearer {self.settings.api_token.get_secret_value()}"
            try:
                async with httpx.AsyncClient(timeout=READY_ASK_S) as client:
                    answer = await client.get(f"{api.url}/readyz", headers=headers)
                ready = answer.json()
                if answer.status_code != 200:
                    problems.append(f"the api is not ready: {ready.get('checks')}")
                elif ready.get("deployment") != view:
                    problems.append(f"the api sees {ready.get('deployment')}, not {view}")
            except (httpx.HTTPError, ValueError) as exc:
                problems.append(f"the api does not answer: {exc}")
        records = open_records(self.settings)
        try:
            period = self.settings.worker_heartbeat_s
            seen = await records.workers(seen_since=time.time() - 3 * period)
            worker = self.children["worker"].pid
            mine = [w for w in seen if w.get("pid") == worker]
            if not mine:
                problems.append("the worker has no fresh heartbeat")
            elif mine[0].get("deployment") != view:
                problems.append(f"the worker sees {mine[0].get('deployment')}, not {view}")
            leader = json.loads(await records.get_meta("scheduler_leader") or "{}")
            if not leader:
                problems.append("no scheduler leads")
            elif leader.get("deployment") != view:
                problems.append(f"the scheduler sees {leader.get('deployment')}, not {view}")
        except RecordsError as exc:
            problems.append(f"the records do not answer: {exc}")
        finally:
            await records.close()
        return problems

    async def _rotate_keys(self, stop: asyncio.Event) -> None:
        interval = float(self.settings.key_rotation_interval_s or 0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            rotation = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral", "rotate-keys",
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                status = await rotation.wait()
            finally:  # the stack stops mid-rotation (which is safe to interrupt): so does it
                if rotation.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(rotation.pid, signal.SIGKILL)
                    await rotation.wait()
            logger.info("corral stack: key rotation exited with status %s", status)

    async def _stop_children(self) -> None:
        """SIGTERM every child's group, wait the grace period, SIGKILL what is left."""
        running = [c for c in self.children.values() if c.pid is not None]
        for child in running:
            _signal_group(child, signal.SIGTERM)
        grace = self.settings.worker_grace_s + KILL_AFTER_GRACE_S
        waits = [asyncio.create_task(c.process.wait()) for c in running if c.process]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace)
            if late:
                for child in running:
                    if child.pid is not None:
                        logger.warning("corral stack: %s did not stop in %.0f s; killing it",
                                       child.name, grace)  # fmt: skip
                        _signal_group(child, signal.SIGKILL)
                await asyncio.wait(late)
        for child in self.children.values():  # a group may outlive its leader: clear it
            _signal_group(child, signal.SIGKILL)


def _signal_group(child: Child, signum: signal.Signals) -> None:
    if child.process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signum)


async def run_stack(settings: Settings, stop: asyncio.Event) -> None:
    """`corral stack` until `stop` is set."""
    with tempfile.TemporaryDirectory(prefix="corral-stack-metrics-") as metrics_dir:
        await Stack(settings, metrics_dir).serve(stop)
