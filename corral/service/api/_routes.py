"""The endpoints of DESIGN §10."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from corral._exceptions import ConfigError, InvalidInput, SandboxError
from corral.executors import normalise_app_id
from corral.runtime import capabilities
from corral.sandbox import Limits
from corral.service import _metrics as metrics
from corral.service._connections import public_view, store_connection
from corral.service._deployment import describe
from corral.service._keys import KeyRingError, check_canary
from corral.service._runs import RunConflict, cancel_run, new_run_id, retry_run, submit_run
from corral.service._scheduler import ScheduleError, check_schedule
from corral.service.api import _models as m
from corral.service.api._app import ApiError, ApiState
from corral.service.api._wait import MAX_WAIT_S
from corral.service.queue import QueueError
from corral.service.records import FINISHED, RecordsError
from corral.service.records._base import MAX_SINCE

router = APIRouter(responses=m.ERROR_RESPONSES)

_ERROR = {"model": m.ErrorBody}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {**_ERROR, "description": "no such item"}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {**_ERROR, "description": "not in a state that allows it"}
}
CANCELLING: dict[int | str, dict[str, Any]] = {
    202: {"model": m.RunAccepted, "description": "its worker has not stopped it yet"}
}

EVENTS_POLL_S = 0.1  # how often a stream looks for new events without a ring (Changes)
EVENTS_KEEPALIVE_S = 15.0
READY_CHECK_S = 5.0  # each /readyz check answers within this, or it fails
CANCEL_WAIT_S = 5.0  # a cancel answers once the worker has stopped the run, or 202 after this
FRESH_HEARTBEATS = 3  # a worker is fresh while its last heartbeat is this many periods old
SEEN_HEARTBEATS = 60  # workers silent longer drop off the list


def _state(request: Request) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", what)


class _AnyInput(dict):  # type: ignore[type-arg]
    """An input that has every field: a stored workflow is checked before its runs' inputs
    are known, so `{{ input.… }}` templates are checked for shape only."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: Any) -> Any:
        return self


# -- sandbox -------------------------------------------------------------------------------


@router.post("/api/sandbox/execute", response_model=m.ExecuteResponse, tags=["sandbox"])
async def execute(request: Request, body: m.ExecuteRequest) -> dict[str, Any]:
    """Run connector code in the sandbox; answers the `corral run --json` object (a failed
    execution is `ok: false` with its error, not an HTTP error)."""
    state = _state(request)
    try:
        limits = Limits(**(body.limits.model_dump(exclude_none=True) if body.limits else {}))
        sandbox = state.sandbox(body.executor)
    except ConfigError as exc:
        raise ApiError(422, "invalid_input", str(exc)) from None
    options: dict[str, Any] = {"timeout_ms": body.timeout_ms} if body.timeout_ms else {}
    try:
        result = await sandbox.execute(
            body.code, entry_point=body.entry_point, params=body.params, context=body.context,
            limits=limits, secrets=body.secrets, **options,
        )  # fmt: skip
    except ConfigError as exc:  # limits that contradict the deployment's (e.g. heartbeats)
        raise ApiError(422, "invalid_input", str(exc)) from None
    except SandboxError as error:  # counted by the sandbox (corral.service._sandbox)
        executor = error.executor or sandbox.executor
        return {
            "ok": False,
            "output": None,
            "logs": [entry.to_dict() for entry in error.logs],
            "executor": executor,
            "usage": error.usage.to_dict() if error.usage is not None else None,
            "error": error.to_dict(),
        }
    return result.to_dict()


# -- connections ---------------------------------------------------------------------------


def _known_app(state: ApiState, app: str) -> str:
    try:
        return state.runtime.framework.connector(app).id
    except InvalidInput as exc:
        raise _not_found(exc.message) from None


@router.put(
    "/api/connections/{app}",
    response_model=m.ConnectionView,
    tags=["connections"],
    responses=NOT_FOUND,
)
async def put_connection(request: Request, app: str, body: m.ConnectionRequest) -> dict[str, Any]:
    """Store the connection of `app`; its credentials are encrypted and never returned."""
    state = _state(request)
    app_id = _known_app(state, app)
    return await store_connection(
        state.records, state.ring, app_id, body.baseUrl, body.credentials, time.time()
    )


@router.get("/api/connections", response_model=m.ConnectionList, tags=["connections"])
async def list_connections(request: Request) -> dict[str, Any]:
    """Stored connections: app, baseUrl, credential names, key id, updated; no values."""
    stored = await _state(request).records.list_connections()
    return {"connections": [public_view(connection) for connection in stored]}


@router.delete("/api/connections/{app}", status_code=204, tags=["connections"], responses=NOT_FOUND)
async def delete_connection(request: Request, app: str) -> Response:
    """Remove the connection of `app`."""
    if not await _state(request).records.delete_connection(normalise_app_id(app)):
        raise _not_found(f"no connection is stored for {app!r}")
    return Response(status_code=204)


# -- workflows -----------------------------------------------------------------------------


@router.put("/api/workflows/{workflow_id}", tags=["workflows"])
async def put_workflow(
    request: Request, workflow_id: str, definition: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Store a workflow after checking it (apps, functions, dependencies, templates)."""
    state = _state(request)
    if definition.get("id", workflow_id) != workflow_id:
        raise ApiError(
            422, "invalid_input", f"the body's id {definition.get('id')!r} is not {workflow_id!r}"
        )
    definition = {**definition, "id": workflow_id}
    try:
        state.runtime.check(definition, _AnyInput())
        _check_firing(state, definition)
    except (InvalidInput, ScheduleError) as exc:
        raise ApiError(422, "invalid_input", str(exc)) from None
    await state.records.put_workflow(definition, time.time())
    return definition


def _check_firing(state: ApiState, definition: dict[str, Any]) -> None:
    """The workflow's trigger names a trigger of the catalog; its schedule is one the
    scheduler can fire."""
    if "schedule" in definition:
        check_schedule(definition["schedule"])
    trigger = definition.get("trigger")
    if trigger is None:
        return
    if not isinstance(trigger, dict) or not isinstance(trigger.get("app"), str):
        raise InvalidInput('`trigger` must be {"app", "trigger", "params", "interval_s"}')
    operation = state.runtime.framework.connector(trigger["app"]).operation(
        str(trigger.get("trigger"))
    )
    if operation.kind != "trigger":
        raise InvalidInput(f"`trigger`: {operation.app}.{operation.id} is an action")
    interval = trigger.get("interval_s", 60)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise InvalidInput("`trigger.interval_s` must be a positive number of seconds")


@router.get("/api/workflows/{workflow_id}", tags=["workflows"], responses=NOT_FOUND)
async def get_workflow(request: Request, workflow_id: str) -> dict[str, Any]:
    """A stored workflow."""
    definition = await _state(request).records.get_workflow(workflow_id)
    if definition is None:
        raise _not_found(f"no workflow {workflow_id!r} is stored")
    return definition


@router.delete(
    "/api/workflows/{workflow_id}", status_code=204, tags=["workflows"], responses=NOT_FOUND
)
async def delete_workflow(request: Request, workflow_id: str) -> Response:
    """Remove a stored workflow (its runs stay)."""
    if not await _state(request).records.delete_workflow(workflow_id):
        raise _not_found(f"no workflow {workflow_id!r} is stored")
    return Response(status_code=204)


@router.get("/api/workflows", response_model=m.WorkflowList, tags=["workflows"])
async def list_workflows(request: Request) -> dict[str, Any]:
    """Stored workflows, with trigger, schedule and last run."""
    records = _state(request).records
    listed = []
    for entry in await records.list_workflows():
        last, _ = await records.list_runs(workflow=entry["id"], limit=1)
        definition = entry["definition"]
        listed.append({
            "id": entry["id"], "trigger": definition.get("trigger"),
            "schedule": definition.get("schedule"), "updated_at": entry["updated_at"],
            "last_run": last[0] if last else None,
        })  # fmt: skip
    return {"workflows": listed}


def _wait_query(what: str) -> Any:
    return Query(
        0, ge=0, le=MAX_WAIT_S,
        description=f"wait up to this long for the run to finish, then answer {what} (0: "
        "answer at once)",
    )  # fmt: skip


@router.post(
    "/api/workflows/{workflow_id}/runs",
    status_code=202,
    response_model=m.RunAccepted,
    response_model_exclude_unset=True,
    tags=["runs"],
    responses={
        **NOT_FOUND, **CONFLICT,
        200: {"description": "with wait_s: the run finished within it", "model": m.RunAccepted},
    },
)  # fmt: skip
async def start_run(
    request: Request,
    workflow_id: str,
    body: m.StartRunRequest,
    response: Response,
    wait_s: float = _wait_query("with the run as it is then, in `run`"),
) -> dict[str, Any]:
    """Queue a run of a stored workflow; `202 {"run_id", "status"}`. With `wait_s`, the
    answer also holds the run (as GET /api/runs/ID gives it) once it has finished, with
    status 200, or as it is when the wait ends, with 202: one request runs a workflow and
    gets its result."""
    state = _state(request)
    definition = await state.records.get_workflow(workflow_id)
    if definition is None:
        raise _not_found(f"no workflow {workflow_id!r} is stored")
    try:
        state.runtime.check(definition, body.input)
    except InvalidInput as exc:
        raise ApiError(422, "invalid_input", exc.message) from None
    run_id = body.run_id or new_run_id()
    submit = submit_run(state.records, state.queue, definition, body.input, run_id=run_id)
    try:
        if not wait_s:
            await submit
            return {"run_id": run_id, "status": "queued"}
        record = await state.waiter.wait(run_id, wait_s, queue=submit)
    except RunConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    record = record or await _run(state, run_id)
    if record["status"] in FINISHED:
        response.status_code = 200
    return {"run_id": run_id, "status": record["status"], "run": record}


# -- runs ----------------------------------------------------------------------------------


@router.get("/api/runs", response_model=m.RunList, tags=["runs"])
async def list_runs(
    request: Request,
    status: str | None = Query(None, description="queued, running, succeeded, failed, cancelled"),
    workflow: str | None = None,
    since: float | None = Query(
        None, ge=0, le=MAX_SINCE, description="created at or after (epoch seconds)"
    ),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=300),
) -> dict[str, Any]:
    """Runs, newest first; `next_cursor` fetches the next page."""
    try:
        runs, next_cursor = await _state(request).records.list_runs(
            status=status, workflow=workflow, since=since, limit=limit, cursor=cursor
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_input", str(exc)) from None
    return {"runs": runs, "next_cursor": next_cursor}


async def _run(state: ApiState, run_id: str) -> dict[str, Any]:
    record = await state.records.get_run(run_id)
    if record is None:
        raise _not_found(f"no run {run_id!r}")
    return record


@router.get("/api/runs/{run_id}", response_model=m.RunView, tags=["runs"], responses=NOT_FOUND)
async def get_run(
    request: Request,
    run_id: str,
    wait_s: float = _wait_query("it as it is then"),
) -> dict[str, Any]:
    """A run: the `corral workflow run --json` object, with per-node logs and usage."""
    state = _state(request)
    record = await _run(state, run_id)
    if wait_s and record["status"] not in FINISHED:
        record = await state.waiter.wait(run_id, wait_s) or await _run(state, run_id)
    return record


@router.get(
    "/api/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "description": "the run's events"},
    },
    tags=["runs"],
)
async def run_events(
    request: Request,
    run_id: str,
    last_event_id: Annotated[int, Header(ge=0)] = 0,
) -> StreamingResponse:
    """Server-sent events of a run: run.started, node.started, node.attempt_failed,
    node.retry, node.fallback, node.replay, node.finished, run.finished, … (each `data` is
    the event's JSON, each `id` its sequence number: reconnect with Last-Event-ID). The
    stream ends once the run has finished and every event was sent."""
    state = _state(request)
    await _run(state, run_id)

    async def stream() -> AsyncIterator[bytes]:
        changes = state.records.changes()
        grew = asyncio.Event()  # "clear, look, wait" (corral.service._changes)
        changes.subscribe("events", grew)
        changes.subscribe("runs", grew)  # the run's end
        after, quiet = last_event_id, 0.0
        try:
            while True:
                grew.clear()
                events = await state.records.run_events(run_id, after=after)
                for seq, event in events:
                    after = seq
                    name = str(event.get("event", "message"))
                    yield f"id: {seq}\nevent: {name}\ndata: {json.dumps(event)}\n\n".encode()
                if events:
                    quiet = 0.0
                    continue
                record = await state.records.get_run(run_id)
                if record is None or record["status"] in FINISHED:
                    if not await state.records.run_events(run_id, after=after):
                        return
                    continue
                started = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(grew.wait(), EVENTS_POLL_S)
                quiet += time.monotonic() - started
                if quiet >= EVENTS_KEEPALIVE_S:  # proxies drop a silent connection
                    quiet = 0.0
                    yield b": keep-alive\n\n"
        finally:
            changes.unsubscribe("events", grew)
            changes.unsubscribe("runs", grew)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


@router.post(
    "/api/runs/{run_id}/cancel",
    response_model=m.RunAccepted,
    tags=["runs"],
    responses={**NOT_FOUND, **CONFLICT, **CANCELLING},
)
async def cancel(request: Request, run_id: str, response: Response) -> dict[str, Any]:
    """Stop a queued or running run (its sandbox execution is killed). 200 once cancelled;
    202 when its worker has not stopped it yet."""
    state = _state(request)
    try:
        record = await cancel_run(state.records, state.queue, run_id)
    except RunConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    if record is None:
        raise _not_found(f"no run {run_id!r}")
    if record["status"] not in FINISHED:
        await state.waiter.wait(run_id, CANCEL_WAIT_S)
        record = await _run(state, run_id)
        if record["status"] not in FINISHED:
            response.status_code = 202
    return {"run_id": run_id, "status": record["status"]}


@router.post(
    "/api/runs/{run_id}/retry",
    status_code=202,
    response_model=m.RunAccepted,
    tags=["runs"],
    responses={**NOT_FOUND, **CONFLICT},
)
async def retry(request: Request, run_id: str) -> dict[str, Any]:
    """Queue a failed or cancelled run again under its id: finished nodes replay."""
    state = _state(request)
    try:
        record = await retry_run(state.records, state.queue, run_id)
    except RunConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    if record is None:
        raise _not_found(f"no run {run_id!r}")
    return {"run_id": run_id, "status": record["status"]}


# -- operations ----------------------------------------------------------------------------


@router.get("/api/breakers", response_model=m.BreakerList, tags=["operations"])
async def breakers(request: Request) -> dict[str, Any]:
    """Circuit breakers that are open, half-open or counting failures."""
    found = await _state(request).store.breakers()
    return {"breakers": [{"name": name, **vars(state)} for name, state in found.items()]}


@router.post(
    "/api/breakers/{name:path}/reset",
    response_model=m.BreakerView,
    tags=["operations"],
    responses=NOT_FOUND,
)
async def reset_breaker(request: Request, name: str) -> dict[str, Any]:
    """Close a breaker by hand."""
    if not await _state(request).store.reset_breaker(name):
        raise _not_found(f"breaker {name!r} is closed")
    return {"name": name, "state": "closed", "failures": 0, "opened_at": None}


async def _workers(state: ApiState) -> list[dict[str, Any]]:
    period = state.settings.worker_heartbeat_s
    now = time.time()
    seen = await state.records.workers(seen_since=now - SEEN_HEARTBEATS * period)
    return [{**w, "fresh": w["last_heartbeat"] >= now - FRESH_HEARTBEATS * period} for w in seen]


@router.get("/api/workers", response_model=m.WorkerList, tags=["operations"])
async def workers(request: Request) -> dict[str, Any]:
    """Workers seen lately: id, host, pid, running, last heartbeat, fresh."""
    return {"workers": await _workers(_state(request))}


@router.get("/api/registry/capabilities", tags=["operations"])
async def registry(request: Request) -> dict[str, Any]:
    """The capabilities map (DESIGN §9)."""
    return capabilities(_state(request).runtime.framework)


@router.get("/healthz", response_model=m.Health, tags=["operations"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=m.Readiness,
    responses={503: {"model": m.Readiness, "description": "a check failed"}},
    tags=["operations"],
)
async def readyz(request: Request, response: Response) -> dict[str, Any]:
    """Ready when the records take a write, the key ring decrypts the canary, the queue
    answers and a worker's heartbeat is fresh; the body names each check's outcome."""
    state = _state(request)

    async def check(probe: Any) -> str:
        try:
            async with asyncio.timeout(READY_CHECK_S):  # a Redis that stopped answering
                await probe()
            return "ok"
        except TimeoutError:  # before OSError, which it is
            return f"no answer within {READY_CHECK_S:g} s"
        except (RecordsError, QueueError, KeyRingError, OSError) as exc:
            return str(exc)

    async def worker_fresh() -> None:
        if not any(w["fresh"] for w in await _workers(state)):
            raise RecordsError(
                "no worker heartbeat is fresh: start `corral worker`, or ENABLE_INLINE_WORKER"
            )

    probes = {
        "store": state.records.ping,
        "keys": lambda: check_canary(state.records, state.ring),
        "queue": state.queue.ping,
        "worker": worker_fresh,
    }
    outcomes = await asyncio.gather(*(check(probe) for probe in probes.values()))
    checks = dict(zip(probes, outcomes, strict=True))
    ready = all(outcome == "ok" for outcome in checks.values())
    if not ready:
        response.status_code = 503
    return {"ready": ready, "deployment": describe(state.settings), "checks": checks}


@router.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
async def metrics_text(request: Request) -> PlainTextResponse:
    """Prometheus metrics (DESIGN §10)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state = _state(request)
    shared = metrics.state_registry(
        runs=await state.records.finished_counts(),
        queue=await state.queue.counts(),
        fresh_workers=sum(1 for w in await _workers(state) if w["fresh"]),
        breakers={name: b.state for name, b in (await state.store.breakers()).items()},
    )
    return PlainTextResponse(
        generate_latest(metrics.process_registry()) + generate_latest(shared),
        media_type=CONTENT_TYPE_LATEST,
    )
