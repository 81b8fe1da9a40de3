"""Request and response bodies of the API (they make /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.service._error_body import ERROR_RESPONSES as ERROR_RESPONSES  # re-exported
from corral.service._error_body import ErrorBody as ErrorBody


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- sandbox -------------------------------------------------------------------------------


class LimitsBody(_Strict):
    """Limits of one execution; unset fields take the deployment's defaults."""

    max_cpu_ms: int | None = Field(None, gt=0)
    cpu_quota_ms: int | None = Field(None, gt=0)
    max_memory_mb: int | None = Field(None, gt=0)
    heartbeat_interval_ms: int | None = Field(None, ge=25)
    heartbeat_timeout_ms: int | None = Field(None, gt=0)


class ExecuteRequest(_Strict):
    code: str = Field(description="the connector source (Python, run under RestrictedPython)")
    entry_point: str = "run"
    params: Any = Field(default_factory=dict)
    context: Any = Field(default_factory=dict)
    limits: LimitsBody | None = None
    secrets: list[str] = Field(default_factory=list, description="masked in logs and output")
    executor: Literal["process", "worker"] | None = None
    timeout_ms: int | None = Field(None, gt=0, le=600_000)


class LogLine(BaseModel):
    level: str
    message: str


class UsageBody(BaseModel):
    wall_ms: float
    cpu_ms: float
    peak_memory_bytes: int | None


class ExecuteResponse(BaseModel):
    """The `corral run --json` object."""

    ok: bool
    output: Any
    logs: list[LogLine]
    executor: str
    usage: UsageBody | None
    error: dict[str, Any] | None


# -- connections ---------------------------------------------------------------------------


class ConnectionRequest(_Strict):
    baseUrl: str | None = Field(None, description="overrides the connector's base URL")
    credentials: dict[str, Any] = Field(
        default_factory=dict, description="encrypted at rest, never returned"
    )


class ConnectionView(BaseModel):
    app: str
    baseUrl: str | None
    credential_names: list[str]
    key_id: str
    updated_at: float


class ConnectionList(BaseModel):
    connections: list[ConnectionView]


# -- workflows and runs --------------------------------------------------------------------


class RunSummary(BaseModel):
    id: str
    workflow: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_s: float | None
    error_type: str | None


class WorkflowSummary(BaseModel):
    id: str
    trigger: dict[str, Any] | None
    schedule: dict[str, Any] | None
    updated_at: float
    last_run: RunSummary | None


class WorkflowList(BaseModel):
    workflows: list[WorkflowSummary]


class StartRunRequest(_Strict):
    input: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")


class RunList(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None


class NodeResult(BaseModel):
    status: str
    output: Any
    metadata: dict[str, Any]
    error: dict[str, Any] | None
    logs: list[LogLine] = Field(default_factory=list)
    usage: UsageBody | None = None


class RunView(BaseModel):
    """The `corral workflow run --json` object, with the run's record around it."""

    id: str
    workflow: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    nodes: dict[str, NodeResult]
    input: dict[str, Any]
    error: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    cancel_requested: bool


class RunAccepted(BaseModel):
    """A run queued; with `wait_s`, also the run as it is once it finished or the wait ended."""

    run_id: str
    status: str
    run: RunView | None = Field(None, description="only with wait_s: the run, as GET gives it")


# -- operations ----------------------------------------------------------------------------


class BreakerView(BaseModel):
    name: str
    state: Literal["closed", "open", "half_open"]
    failures: int
    opened_at: float | None


class BreakerList(BaseModel):
    breakers: list[BreakerView]


class WorkerView(BaseModel):
    id: str
    host: str
    pid: int
    running: int
    last_heartbeat: float
    fresh: bool


class WorkerList(BaseModel):
    workers: list[WorkerView]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    deployment: str = Field(description="the queue and records this API uses")
    checks: dict[str, str] = Field(description='"ok", or what failed')
