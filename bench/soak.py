"""Soak: thousands of executions of mixed outcomes on both backends, several in flight.

    python bench/soak.py [--executions N] [--in-flight K] [--json]

Every execution's outcome is checked (the right output for its own params,
or the right error type), none may be lost (each has a deadline), and the
host is sampled before (after a warm-up) and after: its open descriptors,
child processes and cgroups may not grow, its RSS may grow less than 10%.
After the sandboxes close, none of their processes or cgroups may be left.
The outcomes are mostly cheap (ok, brokered HTTP, code errors, policy
violations, invalid input, output caps, cancellations); the costly kills
(CPU, memory, wall time, heartbeat) are a minority.

Exit status 0 when the soak passed, 1 otherwise. `tests/test_soak.py` runs
`soak()` with a small count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.server
import json
import os
import random
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from corral import Limits, NodeSandbox, SandboxError
from corral.config import load_settings
from corral.sandbox._cgroups import CgroupUnavailable, default_roots

BACKENDS = ("process", "worker")
LIMITS = Limits(max_memory_mb=64, max_cpu_ms=1000)
LOST_AFTER_S = 60.0  # an execution still unanswered after this is lost (the longest takes ~0.2 s)
CANCEL_AFTER_S = 0.02  # a cancelled execution is cancelled this long after it was started
SETTLE_S = 10.0  # killed children reaped, their cgroups removed, replacements forked
MAX_RSS_GROWTH = 0.10
MAX_WRONG_SHOWN = 20


@dataclass(frozen=True)
class Kind:
    """One kind of execution and the outcome it must have."""

    code: str
    expect: str  # "ok", "cancelled", or the SandboxError type
    limits: Limits | None = None
    timeout_ms: int = 10_000
    entry_point: str = "run"
    costly: bool = False  # ends in a kill after tens of milliseconds of CPU or wall time


KINDS = {
    "ok": Kind(
        "import json\ndef run(params, context):\n    log('job', params['n'])\n"
        "    print('printed', params['n'])\n"
        "    return {'n': params['n'], 'context': context}\n", "ok",
    ),
    "http_ok": Kind(
        "def run(params, context):\n"
        "    return http.get(params['url'] + '/ok/' + str(params['n'])).json()\n", "ok",
    ),
    "http_error": Kind(
        "def run(params, context):\n"
        "    http.get(params['url'] + '/fail').raise_for_status()\n", "http_error",
    ),
    "code_error": Kind("def run(params, context):\n    raise ValueError(params['n'])\n",
                       "code_error"),
    "syntax_error": Kind("def run(params, context)\n    return 1\n", "code_error"),
    "not_json": Kind("def run(params, context):\n    return {1, 2}\n", "code_error"),
    "invalid_input": Kind("def other(params, context):\n    return 1\n", "invalid_input"),
    "policy_violation": Kind("import os\ndef run(params, context):\n    return 1\n",
                             "policy_violation"),
    "output_limit": Kind("def run(params, context):\n    return 'x' * 5000\n", "output_limit",
                         Limits(max_output_bytes=1000)),
    "cancelled": Kind("import time\ndef run(params, context):\n    time.sleep(10)\n",
                      "cancelled"),
    "timeout": Kind("import time\ndef run(params, context):\n    time.sleep(10)\n", "timeout",
                    timeout_ms=60, costly=True),
    "cpu_limit": Kind("def run(params, context):\n    while True:\n        pass\n", "cpu_limit",
                      Limits(max_cpu_ms=50), costly=True),
    "memory_limit": Kind(
        "def run(params, context):\n    hoard = []\n    while True:\n"
        "        hoard.append('x' * 100_000)\n", "memory_limit", Limits(max_memory_mb=32),
        costly=True,
    ),
    "heartbeat_timeout": Kind(
        "import re\ndef run(params, context):\n"
        "    return re.match(r'(a+)+$', 'a' * 64 + 'b')\n", "heartbeat_timeout",
        Limits(heartbeat_interval_ms=25, heartbeat_timeout_ms=60, max_cpu_ms=None),
        costly=True,
    ),
}  # fmt: skip
#: How many of each kind in every 24 executions of a backend: the costly ones are 1 in 6.
DECK = {"ok": 9, "http_ok": 1, "http_error": 1, "code_error": 1, "syntax_error": 1,
        "not_json": 1, "invalid_input": 1, "policy_violation": 1, "output_limit": 1,
        "cancelled": 3, "timeout": 1, "cpu_limit": 1, "memory_limit": 1,
        "heartbeat_timeout": 1}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """What the host holds at one moment."""

    fds: int
    children: int
    cgroups: int
    rss_mb: float
    threads: int

    def grown(self, before: Sample) -> list[str]:
        """What grew past `before` (RSS: by MAX_RSS_GROWTH or more)."""
        grown = [
            f"{name} grew from {getattr(before, name)} to {getattr(self, name)}"
            for name in ("fds", "children", "cgroups")
            if getattr(self, name) > getattr(before, name)
        ]
        if self.rss_mb >= before.rss_mb * (1 + MAX_RSS_GROWTH):
            grown.append(f"host RSS grew {self.rss_mb / before.rss_mb - 1:.1%} "
                         f"({before.rss_mb:.1f} -> {self.rss_mb:.1f} MB)")  # fmt: skip
        return grown


def corral_cgroups(host_pid: int | None = None) -> set[str]:
    """Names of the cgroups of host `host_pid` (this one by default), in any hierarchy."""
    try:
        _, roots = default_roots(None)
    except CgroupUnavailable:
        return set()
    prefix = f"{host_pid or os.getpid()}-"
    found = set()
    for root in roots.values():
        with contextlib.suppress(FileNotFoundError):  # removed while we look
            found.update(p.name for p in root.iterdir() if p.name.startswith(prefix))
    return found


def sandbox_processes(host_pid: int | None = None) -> set[int]:
    """The sandbox processes of host `host_pid` (this one by default), orphans too."""
    marker = re.compile(rf'"host_pid": {host_pid or os.getpid()}[,}}]')
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "corral.sandbox._zygote" in cmdline and marker.search(cmdline):
            found.add(process.pid)
    return found


def sample() -> Sample:
    """The host's descriptors, child processes (all generations), cgroups, RSS and threads."""
    gc.collect()
    me = psutil.Process()
    return Sample(
        fds=me.num_fds(),
        children=len(me.children(recursive=True)),
        cgroups=len(corral_cgroups()),
        rss_mb=round(me.memory_info().rss / 2**20, 1),
        threads=me.num_threads(),
    )


async def steady_sample() -> Sample:
    """A sample once two in a row agree (spares forked, reaper idle), or the last one."""
    previous, deadline = sample(), time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        current = sample()
        if (current.fds, current.children, current.cgroups) == (
            previous.fds, previous.children, previous.cgroups
        ):  # fmt: skip
            return current
        previous = current
    return previous


async def settled_sample(before: Sample) -> Sample:
    """A sample once nothing has grown past `before` (reaping takes a moment), or the last."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        current = await steady_sample()
        if not current.grown(before) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.2)


class _Upstream(http.server.BaseHTTPRequestHandler):
    """The brokered requests' server: /ok/N answers {"n": N}, anything else 503."""

    def do_GET(self) -> None:
        if self.path.startswith("/ok/"):
            body = json.dumps({"n": int(self.path[4:])}).encode()
            self.send_response(200)
        else:
            body = b"try later"
            self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """A local HTTP server on loopback, in a thread; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)  # fmt: skip
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class SoakReport:
    """What the soak did and found."""

    executions: int
    in_flight: int
    seconds: float = 0.0
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # backend -> kind -> n
    answered: int = 0
    wrong: int = 0
    wrong_shown: list[str] = field(default_factory=list)  # the first MAX_WRONG_SHOWN
    lost: int = 0
    before: Sample | None = None
    after: Sample | None = None
    left_processes: int = 0
    left_cgroups: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the soak passed."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def schedule(executions: int, seed: int = 0) -> list[tuple[str, str]]:
    """(backend, kind) of each execution: the backends alternate, each goes through
    shuffled decks, so that even a short soak has every kind on every backend."""
    rng = random.Random(seed)
    decks: dict[str, list[str]] = {backend: [] for backend in BACKENDS}
    jobs = []
    for i in range(executions):
        backend = BACKENDS[i % len(BACKENDS)]
        if not decks[backend]:
            deck = [kind for kind, count in DECK.items() for _ in range(count)]
            rng.shuffle(deck)
            decks[backend] = deck
        jobs.append((backend, decks[backend].pop()))
    return jobs


def _verdict(name: str, n: int, url: str, backend: str, outcome: Any) -> str | None:
    """What is wrong with `outcome` of execution `n` of kind `name` (a result, an
    exception, "cancelled" or "lost"), or None."""
    kind = KINDS[name]
    if isinstance(outcome, str) and outcome == "lost":
        return f"no answer within {LOST_AFTER_S:.0f} s"
    if kind.expect == "cancelled":
        return None if outcome == "cancelled" else f"expected a cancellation, got {outcome!r}"
    if isinstance(outcome, SandboxError):
        if outcome.type != kind.expect:
            return f"expected {kind.expect}, got {outcome.type}: {outcome.message[:200]}"
        if outcome.type == "http_error" and outcome.status != 503:
            return f"expected http_error 503, got status {outcome.status}"
        return None
    if isinstance(outcome, BaseException) or outcome == "cancelled":
        return f"expected {kind.expect}, got {outcome!r}"
    if kind.expect != "ok":
        return f"expected {kind.expect}, got a result: {outcome.output!r:.200}"
    if outcome.executor != backend:
        return f"ran on {outcome.executor}, not {backend}"
    if name == "ok":
        expected_logs = [("info", f"job {n}"), ("info", f"printed {n}")]
        logs = [(entry.level, entry.message) for entry in outcome.logs]
        if outcome.output != {"n": n, "context": {"url": url}} or logs != expected_logs:
            return f"another execution's answer? output {outcome.output!r}, logs {logs!r}"
    elif outcome.output != {"n": n}:
        return f"another request's answer? output {outcome.output!r}"
    return None


async def _run_one(sandbox: NodeSandbox, kind: Kind, n: int, url: str) -> Any:
    """The outcome of one execution: its result, its exception, "cancelled" or "lost"."""
    task = asyncio.ensure_future(sandbox.execute(
        kind.code, entry_point=kind.entry_point, params={"n": n, "url": url},
        context={"url": url}, timeout_ms=kind.timeout_ms, limits=kind.limits,
    ))  # fmt: skip
    if kind.expect == "cancelled":
        await asyncio.sleep(CANCEL_AFTER_S)
        task.cancel()
    try:
        return await asyncio.wait_for(task, LOST_AFTER_S)
    except asyncio.CancelledError:
        if kind.expect == "cancelled":
            return "cancelled"
        raise
    except TimeoutError:
        return "lost"
    except Exception as exc:
        return exc


@contextlib.asynccontextmanager
async def _sandboxes() -> AsyncIterator[dict[str, NodeSandbox]]:
    settings = load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1")  # the local upstream only
    with contextlib.ExitStack() as stack:
        yield {
            backend: stack.enter_context(NodeSandbox(backend, LIMITS, settings=settings))
            for backend in BACKENDS
        }


async def _drive(
    sandboxes: dict[str, NodeSandbox], jobs: list[tuple[str, str]], in_flight: int, url: str,
    report: SoakReport | None, progress: bool = False,
) -> None:  # fmt: skip
    """Run `jobs` with `in_flight` at a time; record each outcome in `report` (if any)."""
    pending = list(enumerate(jobs))
    pending.reverse()
    total = len(jobs)

    async def stream() -> None:
        while pending:
            n, (backend, name) = pending.pop()
            kind = KINDS[name]
            outcome = await _run_one(sandboxes[backend], kind, n, url)
            if report is None:
                continue
            lost = isinstance(outcome, str) and outcome == "lost"
            report.answered += not lost
            report.lost += lost
            wrong = _verdict(name, n, url, backend, outcome)
            if wrong is None:
                counts = report.outcomes.setdefault(backend, {})
                counts[name] = counts.get(name, 0) + 1
            else:
                report.wrong += not lost  # (a lost one is counted as lost)
                if len(report.wrong_shown) < MAX_WRONG_SHOWN:
                    report.wrong_shown.append(f"#{n} {backend} {name}: {wrong}")
            if progress and report.answered % 100 == 0:
                print(f"\r\033[K{report.answered}/{total} answered", end="", file=sys.stderr,
                      flush=True)  # fmt: skip

    await asyncio.gather(*(stream() for _ in range(in_flight)))
    if progress:
        print(file=sys.stderr)


async def soak(executions: int = 2000, in_flight: int = 4, *, progress: bool = False,
               seed: int = 0) -> SoakReport:  # fmt: skip
    """Run the soak; the report says what happened and whether it passed."""
    report = SoakReport(executions, in_flight)
    with upstream() as url:
        async with _sandboxes() as sandboxes:
            # Every kind on every backend first: lazily made things (the broker's client,
            # replacement workers, compile caches, the default executor's threads) exist.
            await _drive(sandboxes, schedule(2 * sum(DECK.values()), seed + 1), in_flight,
                         url, None)  # fmt: skip
            report.before = await steady_sample()
            started = time.perf_counter()
            await _drive(sandboxes, schedule(executions, seed), in_flight, url, report,
                         progress)  # fmt: skip
            report.seconds = round(time.perf_counter() - started, 2)
            report.after = await settled_sample(report.before)
        deadline = time.monotonic() + SETTLE_S
        while True:  # closed: nothing of the sandboxes may be left
            processes, cgroups = sandbox_processes(), corral_cgroups()
            if not (processes or cgroups) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        report.left_processes, report.left_cgroups = len(processes), len(cgroups)
    if report.wrong:
        report.failures.append(f"{report.wrong} executions had the wrong outcome")
    if report.lost or report.answered != executions:
        report.failures.append(f"{executions - report.answered} executions lost")
    report.failures += report.after.grown(report.before)
    if report.left_processes or report.left_cgroups:
        report.failures.append(f"left after close: {report.left_processes} sandbox processes, "
                               f"{report.left_cgroups} cgroups")  # fmt: skip
    return report


def _print(report: SoakReport) -> None:
    total = sum(sum(counts.values()) for counts in report.outcomes.values())
    print(f"{report.executions} executions, {report.in_flight} in flight, "
          f"{report.seconds:.1f} s ({report.executions / max(report.seconds, 1e-9):.0f}/s); "
          f"right outcome: {total}, wrong: {report.wrong}, lost: {report.lost}")  # fmt: skip
    kinds = list(DECK)
    print(f"{'outcome':<20}" + "".join(f"{backend:>10}" for backend in BACKENDS))
    for kind in kinds:
        print(
            f"{kind:<20}"
            + "".join(
                f"{report.outcomes.get(backend, {}).get(kind, 0):>10}" for backend in BACKENDS
            )
        )
    assert report.before is not None and report.after is not None
    print(f"\n{'host':<20}{'before':>10}{'after':>10}")
    for name in ("fds", "children", "cgroups", "rss_mb", "threads"):
        print(f"{name:<20}{getattr(report.before, name):>10}{getattr(report.after, name):>10}")
    growth = report.after.rss_mb / report.before.rss_mb - 1
    print(f"host RSS growth: {growth:+.1%} (limit +{MAX_RSS_GROWTH:.0%})")
    print(f"left after close: {report.left_processes} sandbox processes, "
          f"{report.left_cgroups} cgroups")  # fmt: skip
    for line in report.wrong_shown:
        print(f"WRONG {line}")
    print("PASS" if report.ok else "FAIL: " + "; ".join(report.failures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=2000, help="default 2000")
    parser.add_argument("--in-flight", type=int, default=4, help="default 4")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    report = asyncio.run(soak(args.executions, args.in_flight, progress=True))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
