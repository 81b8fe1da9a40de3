"""The API application: its state, the bearer token, the body cap and the error shape.

Every error is `{"error": {"type", "message"}}` with its 4xx (or 500, which is a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.config import Settings
from corral.runtime import WorkflowRuntime, open_store
from corral.runtime.store import Store, StoreError
from corral.sandbox import NodeSandbox
from corral.service import console
from corral.service._keys import KeyRing, ensure_canary, load_key_ring
from corral.service._sandbox import CountingSandbox
from corral.service._worker import RunWorker
from corral.service.api._wait import RunWaiter
from corral.service.queue import QueueError, RunQueue, open_queue
from corral.service.records import Records, RecordsError, open_records

logger = logging.getLogger("corral.api")

OPEN_PATHS = frozenset({"/healthz", *console.OPEN_PATHS})  # answered without the bearer token


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with `status`."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def error_response(status: int, kind: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


@dataclass
class ApiState:
    """What the endpoints share: the deployment's records, queue, keys, runtime, sandboxes."""

    settings: Settings
    records: Records
    queue: RunQueue
    ring: KeyRing
    store: Store
    runtime: WorkflowRuntime
    sandboxes: dict[str, NodeSandbox] = field(default_factory=dict)
    inline_worker: RunWorker | None = None
    waiter: RunWaiter = field(init=False)

    def __post_init__(self) -> None:
        self.waiter = RunWaiter(self.records)

    def sandbox(self, executor: str | None) -> NodeSandbox:
        """The API's sandbox of `executor` (the deployment's default when None)."""
        kind = executor or str(self.settings.executor)
        if kind not in self.sandboxes:
            self.sandboxes[kind] = CountingSandbox(executor=kind, settings=self.settings)
        return self.sandboxes[kind]


def inline_worker_enabled(settings: Settings) -> bool:
    """ENABLE_INLINE_WORKER, or by default: on with the embedded queue, off with Redis."""
    if settings.enable_inline_worker is not None:
        return settings.enable_inline_worker
    return not settings.redis_url


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with contextlib.AsyncExitStack() as stack:
        ring = load_key_ring(settings)
        queue = open_queue(settings)
        stack.push_async_callback(queue.close)
        records = open_records(settings)
        stack.push_async_callback(records.close)
        store = open_store(settings)
        runs_sandbox = CountingSandbox(settings=settings)
        stack.callback(runs_sandbox.close)
        runtime = WorkflowRuntime(settings, store=store, sandbox=runs_sandbox)
        stack.push_async_callback(runtime.aclose)
        await ensure_canary(records, ring)
        state = ApiState(settings, records, queue, ring, store, runtime)
        stack.push_async_callback(state.waiter.close)
        stack.callback(lambda: [box.close() for box in state.sandboxes.values()])
        app.state.api = state
        # The process's stop when run_api gave it: the inline worker stops taking runs at
        # once, its grace running alongside uvicorn's for the open requests.
        stop = getattr(app.state, "stop", None) or asyncio.Event()
        worker_task: asyncio.Task[None] | None = None
        if inline_worker_enabled(settings):
            from corral.service._connections import connections_for

            async def connections(definition: dict[str, Any]) -> dict[str, Any]:
                return await connections_for(records, ring, definition)

            state.inline_worker = RunWorker(
                queue, records, runtime,
                concurrency=settings.worker_concurrency, grace_s=settings.worker_grace_s,
                heartbeat_s=settings.worker_heartbeat_s, connections=connections,
            )  # fmt: skip
            worker_task = asyncio.create_task(state.inline_worker.serve(stop))
        try:
            yield
        finally:
            stop.set()
            if worker_task is not None:
                await worker_task


class BodyLimit:
    """Answers 413 for a request body over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._too_large()(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            "payload_too_large",
            f"the request body is over {self.limit} bytes (CORRAL_API_MAX_BODY_BYTES)",
        )


class _TooLarge(Exception):
    pass


class BearerToken:
    """Requires `Authorization: Bearer <token>` on every path but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, credential = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential, self.token):
                answer = error_response(
                    401,
                    "unauthorized",
                    "a bearer token is required: send Authorization: Bearer <CORRAL_API_TOKEN>",
                    **{"www-authenticate": "Bearer"},
                )
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid request")
    return 422, "invalid_input", f"{where}: {message}" if where else message


def create_app(settings: Settings) -> FastAPI:
    """The corral API for `settings` (see DESIGN §10)."""
    from corral.service.api import _routes

    app = FastAPI(
        title="corral",
        version="0.1.0",
        description="Sandboxed connector runs: workflows, runs, connections, operations.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    # The routes themselves, not app.include_router: FastAPI matches the routes of an
    # included router twice per request, which was most of a small request's cost.
    app.router.routes.extend([*_routes.router.routes, *console.router.routes])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.kind, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*_validation_message(exc))

    @app.exception_handler(RecordsError)
    @app.exception_handler(QueueError)
    @app.exception_handler(StoreError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis gone, a locked or full state database: the message says which and where.
        return error_response(503, "unavailable", str(exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("corral api: %s %s failed", request.method, request.url.path)
        return error_response(500, "internal", f"{type(exc).__name__} (see the API's log)")

    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    if settings.api_token is not None:
        app.add_middleware(BearerToken, token=settings.api_token.get_secret_value())
    return app


def json_body(raw: bytes) -> Any:
    """A request body parsed as JSON; ApiError 400 when it is not."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
