"""The console's page and assets, and the two views it needs that no other endpoint gives:
the coverage of every operation of the catalog (the registry leaves out what cannot run)
and the recent actionable events across runs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from corral.config import FLAGS
from corral.executors import ConnectorFramework, Operation
from corral.runtime import capabilities
from corral.service._error_body import ERROR_RESPONSES

STATIC = Path(__file__).with_name("static")
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
#: Answered without the bearer token: the page and its assets, which hold no data.
OPEN_PATHS = frozenset({"/", *(f"/console/{name}" for name in ASSETS)})
#: The page runs only its own script and style and talks only to this origin.
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
#: Events an operator acts on (DESIGN §7): failed attempts, fallbacks, breakers, hand-backs
#: (and a run.finished that failed).
ACTIONABLE = frozenset({
    "node.attempt_failed", "node.fallback", "node.circuit_open", "breaker.transition",
    "node.conflict", "run.handed_back",
})  # fmt: skip
EVENT_RUNS = 50  # the newest runs whose events the recent-events view reads

router = APIRouter(responses=ERROR_RESPONSES)


@functools.cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The console's single page (hash routes: #/runs, #/capabilities, #/health, …)."""
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/console/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """The console's script and style sheet."""
    if name not in ASSETS:
        raise HTTPException(404, f"the console has no asset {name!r}")
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)


# -- coverage ------------------------------------------------------------------------------


class OperationCoverage(BaseModel):
    kind: Literal["action", "trigger"]
    id: str
    name: str
    executor: Literal["bespoke", "generic", "none"] = Field(
        description="what runs it here: its bespoke handler, the generic path, or nothing"
    )
    fallback: str | None
    reason: str | None = Field(description="why nothing runs it (executor none)")


class AppCoverage(BaseModel):
    id: str
    name: str
    operations: list[OperationCoverage]


class Coverage(BaseModel):
    generic_executor_enabled: bool
    apps: list[AppCoverage]


def _uncovered(operation: Operation, generic: bool) -> str:
    if not operation.has_http_metadata:
        return "no bespoke handler, and no method and endpoint for the generic executor"
    if not generic:
        return (
            "no bespoke handler, and GENERIC_EXECUTOR_ENABLED is off (set it to true to run "
            "it through the generic executor)"
        )
    return "nothing in this deployment runs it"


def coverage(framework: ConnectorFramework) -> dict[str, Any]:
    """Every operation of the catalog with what runs it under the current flags."""
    generic = FLAGS.GENERIC_EXECUTOR_ENABLED
    registry = capabilities(framework)
    apps = []
    for app in framework.apps():
        connector = framework.connector(app)
        listed = registry.get(app, {})
        operations = []
        for kind, found in (("action", connector.actions), ("trigger", connector.triggers)):
            for operation in found.values():
                entry = listed.get(f"{kind}s", {}).get(operation.id)
                operations.append({
                    "kind": kind, "id": operation.id, "name": operation.name or operation.id,
                    "executor": entry["executor"] if entry else "none",
                    "fallback": entry["fallback"] if entry else None,
                    "reason": None if entry else _uncovered(operation, generic),
                })  # fmt: skip
        apps.append({"id": app, "name": connector.name or app, "operations": operations})
    return {"generic_executor_enabled": generic, "apps": apps}


@router.get("/api/console/coverage", response_model=Coverage, tags=["console"])
async def coverage_view(request: Request) -> dict[str, Any]:
    """Every action and trigger of the catalog with what runs it (bespoke, generic or none)
    under this process's GENERIC_EXECUTOR_ENABLED; the registry lists only what can run."""
    return coverage(request.app.state.api.runtime.framework)


# -- recent events -------------------------------------------------------------------------


class RecentEvent(BaseModel):
    run: str
    workflow: str
    seq: int
    event: str
    ts: float | None
    fields: dict[str, Any] = Field(description="the event's other fields (node, error, …)")


class RecentEvents(BaseModel):
    events: list[RecentEvent]


@router.get("/api/console/events", response_model=RecentEvents, tags=["console"])
async def recent_events(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    """Actionable events (failed attempts, fallbacks, breaker transitions, …) of the newest
    runs, newest first."""
    records = request.app.state.api.records
    runs, _ = await records.list_runs(limit=EVENT_RUNS)
    found: list[dict[str, Any]] = []
    for run in runs:
        for seq, event in await records.run_events(run["id"]):
            name = str(event.get("event", ""))
            if name in ACTIONABLE or (name == "run.finished" and event.get("status") == "failed"):
                ts = event.get("ts")
                fields = {k: v for k, v in event.items() if k not in ("event", "ts", "run")}
                found.append({
                    "run": run["id"], "workflow": run["workflow"], "seq": seq, "event": name,
                    "ts": ts if isinstance(ts, int | float) else None, "fields": fields,
                })  # fmt: skip
    found.sort(key=lambda item: (item["ts"] or 0, item["seq"]), reverse=True)
    return {"events": found[:limit]}
