"""Serving the API with uvicorn on a socket corral binds itself (so that port 0 works and
the address is announced), stopping when the caller's stop event is set."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator

import uvicorn

from corral._exceptions import ConfigError
from corral.config import Settings
from corral.runtime import open_store
from corral.service._keys import load_key_ring
from corral.service.api._app import create_app, inline_worker_enabled

logger = logging.getLogger("corral.api")


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: the caller owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(settings: Settings) -> socket.socket:
    """The API's listening socket; ConfigError for a public address without a token."""
    host, port = settings.api_host, settings.api_port
    if settings.api_token is None and not is_loopback(host):
        raise ConfigError(
            f"corral: CORRAL_API_HOST={host!r} is not a loopback address and CORRAL_API_TOKEN "
            "is unset: set a token (clients send Authorization: Bearer <token>) or bind 127.0.0.1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, so that asyncio turns Nagle's algorithm off on every accepted
    # connection (it does so only for sockets whose protocol says TCP): with it on, each
    # answer after the first on a kept-alive connection waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"corral: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another CORRAL_API_HOST or CORRAL_API_PORT"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run_api(settings: Settings, stop: asyncio.Event) -> None:
    """`corral api` until `stop` is set."""
    sock = bind(settings)  # a public address without a token: refused before anything
    try:
        load_key_ring(settings)  # bad keys or an unusable state dir: one line, not a trace
        store = open_store(settings)  # an unreachable Redis: likewise
        await store.close()
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    app = create_app(settings)
    app.state.stop = stop  # the inline worker's too
    server = _Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on",
            # open requests get the grace period and 3 s; the process, 6 s (cli/_service.py)
            timeout_graceful_shutdown=int(settings.worker_grace_s) + 3,
        )
    )  # fmt: skip

    async def stopper() -> None:
        await stop.wait()
        server.should_exit = True

    watch = asyncio.create_task(stopper())
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "corral api: listening on http://%s:%d (queue %s, inline worker %s)",
        shown, port, "bullmq" if settings.redis_url else "sqlite",
        "on" if inline_worker_enabled(settings) else "off",
    )  # fmt: skip
    try:
        await server.serve(sockets=[sock])
    finally:
        watch.cancel()
        sock.close()
    if not server.started:
        raise ConfigError("corral: the API did not start (its log above says why)")
