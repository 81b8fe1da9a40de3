"""`corral worker` (and, as they land, `api`, `scheduler`, `stack`): the service processes.

Their dependencies (the service, fastapi, uvicorn, bullmq) are imported inside the
handlers, so that `corral run` does not pay for them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from corral.cli._common import port_number
from corral.config import get_settings


def add_commands(commands: Any) -> None:
    """Add the service processes to the `corral` command."""
    api = commands.add_parser(
        "api",
        help="serve the HTTP API (with an inline worker on the embedded queue)",
        description="Serve the API of DESIGN §10 (FastAPI on uvicorn, OpenAPI at "
        "/openapi.json) on CORRAL_API_HOST:CORRAL_API_PORT (127.0.0.1:8080). With "
        "CORRAL_API_TOKEN every endpoint but /healthz wants `Authorization: Bearer <token>`; "
        "without one only a loopback address may be bound. ENABLE_INLINE_WORKER (default: on "
        "with the embedded queue, off with CORRAL_REDIS_URL) runs a worker in this process. "
        "SIGTERM or Ctrl-C stops it gracefully.",
    )
    api.set_defaults(handler=_api)
    worker = commands.add_parser(
        "worker",
        help="execute queued runs (the service's job worker)",
        description="Lease runs off the queue (embedded SQLite in CORRAL_STATE_DIR, or BullMQ "
        "on CORRAL_REDIS_URL) and execute them through the runtime, "
        "CORRAL_WORKER_CONCURRENCY at a time, renewing each lease and publishing a heartbeat. "
        "SIGTERM or Ctrl-C: take no more runs, let running ones finish for "
        "CORRAL_WORKER_GRACE_S, hand the rest back to the queue (a worker still stopping 6 s "
        "later, its queue not answering, is cancelled and exits 1).",
    )
    worker.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve this worker's Prometheus metrics (sandbox executions, run durations, "
        "node counters) at http://HOST:PORT/metrics (default: $CORRAL_WORKER_METRICS_PORT; "
        "unset: not served; 0: a free port, logged)",
    )
    worker.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="the address of the metrics endpoint (default: $CORRAL_WORKER_METRICS_HOST, "
        "else 127.0.0.1)",
    )
    worker.set_defaults(handler=_worker)
    scheduler = commands.add_parser(
        "scheduler",
        help="poll stored workflows' triggers and fire their schedules",
        description="Poll the triggers of stored workflows on their interval_s and fire "
        "their schedules (cron with a time zone, or interval_s), queueing one run per new "
        "item or occurrence, never twice: several schedulers may run, one leads at a time. "
        "SIGTERM or Ctrl-C: step down and exit.",
    )
    scheduler.set_defaults(handler=_scheduler)
    stack = commands.add_parser(
        "stack",
        help="run the whole service: api, worker and scheduler, supervised",
        description="Run `corral api`, `corral worker` and `corral scheduler` as child "
        "processes (and `corral rotate-keys` every CORRAL_KEY_ROTATION_INTERVAL_S), each in "
        "its own process group, their logs on stderr under their names. It says `ready` once "
        "all three answer and see the same queue and records; it restarts a child that "
        "exits, with backoff; SIGTERM or Ctrl-C stops them all within CORRAL_WORKER_GRACE_S "
        "+ 10 s.",
    )
    stack.set_defaults(handler=_stack)


# A service process asked to stop gets CORRAL_WORKER_GRACE_S plus STOP_AFTER_GRACE_S (the
# API's uvicorn gives open requests the grace period plus 3 s); then it is cancelled, and
# STOP_AFTER_CANCEL_S later it exits regardless: before `corral stack` kills it, at the
# grace period plus 10 s. Its Redis calls have no time-out of their own
# (runtime/store/_redis.py): a Redis that holds its connections but does not answer (a
# stopped one) would otherwise hold a stop forever.
STOP_AFTER_GRACE_S = 6.0
STOP_AFTER_CANCEL_S = 3.0


def _serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], grace_s: float) -> int:
    """Run a service process on uvloop until SIGTERM or SIGINT asks it to stop, which it
    does within `grace_s` (see STOP_AFTER_GRACE_S); 1 when it had to be cancelled."""
    import uvloop

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    stuck = False

    async def run() -> None:
        nonlocal stuck
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        served = asyncio.ensure_future(main(stop))
        asked = asyncio.ensure_future(stop.wait())
        await asyncio.wait({served, asked}, return_when=asyncio.FIRST_COMPLETED)
        asked.cancel()
        if not served.done():
            await asyncio.wait({served}, timeout=grace_s + STOP_AFTER_GRACE_S)
        if not served.done():
            stuck = True
            logging.getLogger("corral.service").error(
                "corral: still stopping %.0f s after being asked (a store or queue that does "
                "not answer?); cancelling what is left", grace_s + STOP_AFTER_GRACE_S,
            )  # fmt: skip
            # From now on nothing may hold the exit: not the clean-up of what is cancelled,
            # nor asyncio's of what is left, nor a thread pool's join at exit. The sandboxes
            # die with the process.
            deadline = threading.Timer(STOP_AFTER_CANCEL_S, os._exit, (1,))
            deadline.daemon = True
            deadline.start()
            served.cancel()
            await asyncio.wait({served})
        if not served.cancelled():
            served.result()  # a crash is raised

    # uvloop: the service's processes spend much of their time in the event loop, and
    # uvloop costs less than asyncio's own per request (bench/service.py).
    uvloop.run(run())
    return 1 if stuck else 0


def _worker(args: argparse.Namespace) -> int:
    from corral.service._worker import run_worker

    settings = get_settings()
    metrics_at = _metrics_address(args, settings)
    return _serve(
        lambda stop: run_worker(settings, stop, metrics_at=metrics_at),
        settings.worker_grace_s,
    )


def _metrics_address(args: argparse.Namespace, settings: Any) -> tuple[str, int] | None:
    """Where `corral worker` serves /metrics: --metrics-port/--metrics-host, else
    CORRAL_WORKER_METRICS_PORT/CORRAL_WORKER_METRICS_HOST; None when no port is given."""
    port = args.metrics_port if args.metrics_port is not None else settings.worker_metrics_port
    if port is None:
        return None
    return args.metrics_host or settings.worker_metrics_host, port


def _api(args: argparse.Namespace) -> int:
    from corral.service.api import run_api

    settings = get_settings()
    return _serve(lambda stop: run_api(settings, stop), settings.worker_grace_s)


def _scheduler(args: argparse.Namespace) -> int:
    from corral.service._scheduler import run_scheduler

    settings = get_settings()
    return _serve(lambda stop: run_scheduler(settings, stop), settings.worker_grace_s)


def _stack(args: argparse.Namespace) -> int:
    from corral.service._stack import KILL_AFTER_GRACE_S, run_stack

    settings = get_settings()
    # its own stop waits for its children's, which are killed KILL_AFTER_GRACE_S past theirs
    grace_s = settings.worker_grace_s + KILL_AFTER_GRACE_S
    return _serve(lambda stop: run_stack(settings, stop), grace_s)
