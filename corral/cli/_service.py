"""`corral worker` (and, as they land, `api`, `scheduler`, `stack`): the service processes.

Their dependencies (the service, fastapi, uvicorn, bullmq) are imported inside the
handlers, so that `corral run` does not pay for them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from corral.config import get_settings


def add_commands(commands: Any) -> None:
    """Add the service processes to the `corral` command."""
    worker = commands.add_parser(
        "worker",
        help="execute queued runs (the service's job worker)",
        description="Lease runs off the queue (embedded SQLite in CORRAL_STATE_DIR, or BullMQ "
        "on CORRAL_REDIS_URL) and execute them through the runtime, "
        "CORRAL_WORKER_CONCURRENCY at a time, renewing each lease and publishing a heartbeat. "
        "SIGTERM or Ctrl-C: take no more runs, let running ones finish for "
        "CORRAL_WORKER_GRACE_S, hand the rest back to the queue.",
    )
    worker.set_defaults(handler=_worker)


def _serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    """Run a service process until SIGTERM or SIGINT asks it to stop."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await main(stop)

    asyncio.run(run())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from corral.service._worker import run_worker

    settings = get_settings()
    return _serve(lambda stop: run_worker(settings, stop))
