"""Deployment settings read from environment variables (DESIGN §2)."""

from __future__ import annotations

import enum
import functools
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from corral._exceptions import ConfigError
from corral.config._imports import DEFAULT_ALLOWED_IMPORTS, SAFE_MODULES


class ExecutorKind(enum.StrEnum):
    """The sandbox backends."""

    PROCESS = "process"
    WORKER = "worker"


_EXECUTOR_ALIASES: dict[str, ExecutorKind] = {
    "process": ExecutorKind.PROCESS,
    "proc": ExecutorKind.PROCESS,
    "child_process": ExecutorKind.PROCESS,
    "processes": ExecutorKind.PROCESS,
    "worker": ExecutorKind.WORKER,
    "worker_thread": ExecutorKind.WORKER,
    "worker-threads": ExecutorKind.WORKER,
    "thread": ExecutorKind.WORKER,
}


def parse_executor(value: str) -> ExecutorKind:
    """An executor name or alias (case-insensitive) as an ExecutorKind."""
    kind = _EXECUTOR_ALIASES.get(value.strip().lower())
    if kind is None:
        allowed = ", ".join(_EXECUTOR_ALIASES)
        raise ValueError(f"unknown executor {value!r}; use one of: {allowed}")
    return kind


class CgroupMode(enum.StrEnum):
    """Whether per-execution cgroups are used."""

    AUTO = "auto"  # use them where the host allows, else degrade with a warning
    REQUIRED = "required"  # refuse to run without them
    OFF = "off"  # never: rlimits and polling only


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


PositiveMs = Annotated[int, Field(gt=0)]
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every setting of a deployment; each field is read from the env var named by its alias."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", env_ignore_empty=True, frozen=True
    )

    sandbox_executor: ExecutorKind | None = Field(
        None,
        alias="SANDBOX_EXECUTOR",
        description="process (also proc, child_process, processes) or worker "
        "(also worker_thread, worker-threads, thread)",
    )
    worker_sandbox_enabled: bool = Field(
        False, alias="WORKER_SANDBOX_ENABLED", description="true or false"
    )
    sandbox_max_cpu_ms: PositiveMs | None = Field(
        None,
        alias="SANDBOX_MAX_CPU_MS",
        description="a positive whole number of milliseconds of CPU time; unset for no limit",
    )
    sandbox_cpu_quota_ms: PositiveMs | None = Field(
        None,
        alias="SANDBOX_CPU_QUOTA_MS",
        description="a positive whole number of CPU milliseconds per 100 ms period "
        "(100 = one core); unset for no throttle",
    )
    sandbox_max_memory_mb: PositiveMs | None = Field(
        None,
        alias="SANDBOX_MAX_MEMORY_MB",
        description="a positive whole number of megabytes; unset for no limit",
    )
    sandbox_cgroup_root: str | None = Field(
        None,
        alias="SANDBOX_CGROUP_ROOT",
        description="a cgroup path such as 'corral' or '/system.slice/corral'",
    )
    sandbox_heartbeat_interval_ms: int = Field(
        500,
        ge=25,
        alias="SANDBOX_HEARTBEAT_INTERVAL_MS",
        description="a whole number of milliseconds, at least 25",
    )
    sandbox_heartbeat_timeout_ms: PositiveMs = Field(
        3000,
        alias="SANDBOX_HEARTBEAT_TIMEOUT_MS",
        description="a whole number of milliseconds, at least twice SANDBOX_HEARTBEAT_INTERVAL_MS",
    )
    generic_executor_enabled: bool = Field(
        False, alias="GENERIC_EXECUTOR_ENABLED", description="true or false"
    )
    enable_inline_worker: bool | None = Field(
        None, alias="ENABLE_INLINE_WORKER", description="true or false"
    )
    state_dir: Path = Field(
        Path(".corral"), alias="CORRAL_STATE_DIR", description="a directory path"
    )
    redis_url: str | None = Field(
        None, alias="CORRAL_REDIS_URL", description="a redis:// or rediss:// URL"
    )
    egress_allow: CommaList = Field(
        default_factory=list,
        alias="CORRAL_EGRESS_ALLOW",
        description="comma-separated domains (*.example.com) and CIDRs",
    )
    egress_deny: CommaList = Field(
        default_factory=list,
        alias="CORRAL_EGRESS_DENY",
        description="comma-separated domains (*.example.com) and CIDRs",
    )
    egress_default: Literal["allow", "deny"] = Field(
        "allow", alias="CORRAL_EGRESS_DEFAULT", description="allow or deny"
    )
    http_timeout_s: float = Field(
        30.0,
        gt=0,
        alias="CORRAL_HTTP_TIMEOUT_S",
        description="a positive number of seconds for one brokered HTTP request",
    )
    http_max_response_bytes: PositiveMs = Field(
        10 << 20,  # 10 MiB: API responses, not downloads
        alias="CORRAL_HTTP_MAX_RESPONSE_BYTES",
        description="a positive whole number of bytes",
    )
    http_max_requests: PositiveMs = Field(
        100,  # per execution: a connector pages through an API, it does not crawl it
        alias="CORRAL_HTTP_MAX_REQUESTS",
        description="a positive whole number of requests per execution",
    )
    http_max_redirects: int = Field(
        5,
        ge=0,
        alias="CORRAL_HTTP_MAX_REDIRECTS",
        description="a whole number of redirects the host follows, 0 for none",
    )
    sandbox_uid: int = Field(
        0x5F000000,  # far above any account a distribution creates
        ge=1,
        le=(1 << 32) - 3,
        alias="CORRAL_SANDBOX_UID",
        description="the first of two unused host uids (and gids) sandbox processes run as",
    )
    connectors_dir: CommaList = Field(
        default_factory=list,
        alias="CORRAL_CONNECTORS_DIR",
        description="colon-separated catalog folders, searched before the shipped one",
    )
    retry_max_attempts: PositiveMs = Field(
        3, alias="CORRAL_RETRY_MAX_ATTEMPTS", description="a positive whole number of attempts"
    )
    retry_initial_ms: PositiveMs = Field(
        200, alias="CORRAL_RETRY_INITIAL_MS", description="a positive whole number of milliseconds"
    )
    retry_max_ms: PositiveMs = Field(
        10_000, alias="CORRAL_RETRY_MAX_MS", description="a positive whole number of milliseconds"
    )
    breaker_failure_threshold: PositiveMs = Field(
        5,
        alias="CORRAL_BREAKER_FAILURE_THRESHOLD",
        description="a positive whole number of consecutive failed executions",
    )
    breaker_reset_ms: PositiveMs = Field(
        30_000,
        alias="CORRAL_BREAKER_RESET_MS",
        description="a positive whole number of milliseconds",
    )
    idempotency_ttl_s: PositiveMs = Field(
        86_400, alias="CORRAL_IDEMPOTENCY_TTL_S", description="a positive whole number of seconds"
    )
    # 30 days: a cursor keeps older items out anyway; keys only need to outlive the window
    # in which an API still lists an item it returned before.
    trigger_seen_ttl_s: PositiveMs = Field(
        30 * 86_400,
        alias="CORRAL_TRIGGER_SEEN_TTL_S",
        description="a positive whole number of seconds",
    )
    api_token: SecretStr | None = Field(
        None, alias="CORRAL_API_TOKEN", description="a bearer token"
    )
    cgroups: CgroupMode = Field(
        CgroupMode.AUTO, alias="CORRAL_CGROUPS", description="auto, required or off"
    )
    allowed_imports: CommaList = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_IMPORTS),
        alias="CORRAL_ALLOWED_IMPORTS",
        description="comma-separated modules among those with a safe view",
    )
    max_output_bytes: PositiveMs = Field(
        1 << 20,  # 1 MiB of JSON: connector results are records, not files
        alias="CORRAL_MAX_OUTPUT_BYTES",
        description="a positive whole number of bytes",
    )
    max_log_bytes: PositiveMs = Field(
        256 << 10,  # 256 KiB of log text per execution stops a log flood early
        alias="CORRAL_MAX_LOG_BYTES",
        description="a positive whole number of bytes",
    )
    worker_pool_size: PositiveMs = Field(
        default_factory=lambda: os.cpu_count() or 1,  # one worker per core keeps them all busy
        alias="CORRAL_WORKER_POOL_SIZE",
        description="a positive whole number of worker processes",
    )
    worker_max_executions: PositiveMs = Field(
        1000,  # bounds what a long-lived interpreter accumulates (caches, fragmentation)
        alias="CORRAL_WORKER_MAX_EXECUTIONS",
        description="a positive whole number of executions before a worker is replaced",
    )
    worker_max_memory_mb: PositiveMs = Field(
        256,  # growth of a worker's resident memory past its start before it is replaced
        alias="CORRAL_WORKER_MAX_MEMORY_MB",
        description="a positive whole number of megabytes",
    )
    max_code_bytes: PositiveMs = Field(
        512 << 10,  # connector sources are a few KiB; this bounds compile time and memory
        alias="CORRAL_MAX_CODE_BYTES",
        description="a positive whole number of bytes",
    )
    # -- the service (corral api / worker / scheduler / stack) --------------------------
    api_host: str = Field("127.0.0.1", alias="CORRAL_API_HOST", description="an address to bind")
    api_port: int = Field(
        8080, ge=0, le=65535, alias="CORRAL_API_PORT", description="a TCP port (0: any free one)"
    )
    api_max_body_bytes: PositiveMs = Field(
        1 << 20,  # 1 MiB: a workflow or a connector source; more is a mistake or an attack
        alias="CORRAL_API_MAX_BODY_BYTES",
        description="a positive whole number of bytes",
    )
    worker_concurrency: PositiveMs = Field(
        4,  # runs mostly wait on connector calls; 4 keeps 2 cores busy without piling up
        alias="CORRAL_WORKER_CONCURRENCY",
        description="a positive whole number of runs",
    )
    worker_grace_s: float = Field(
        30.0,  # a node's default time-out is 15 s: most runs finish; the rest are handed back
        gt=0,
        alias="CORRAL_WORKER_GRACE_S",
        description="a positive number of seconds",
    )
    lease_s: float = Field(
        # How long a worker's hold on a run (and a process's on a node it executes) lasts
        # unrenewed; renewed every third of it: a dead worker's runs restart within ~1-2x.
        30.0,
        gt=0,
        alias="CORRAL_LEASE_S",
        description="a positive number of seconds",
    )
    max_reclaims: int = Field(
        2,  # a run that kills its worker three times would kill the next one too
        ge=0,
        alias="CORRAL_MAX_RECLAIMS",
        description="a whole number of times a lapsed lease is taken back, 0 or more",
    )
    worker_heartbeat_s: float = Field(
        5.0, gt=0, alias="CORRAL_WORKER_HEARTBEAT_S", description="a positive number of seconds"
    )
    encryption_keys: SecretStr | None = Field(
        None,
        alias="CORRAL_ENCRYPTION_KEYS",
        description="comma-separated Fernet keys (the first encrypts, all decrypt)",
    )
    key_rotation_interval_s: PositiveMs | None = Field(
        None,
        alias="CORRAL_KEY_ROTATION_INTERVAL_S",
        description="a positive whole number of seconds; unset: rotate only by hand",
    )
    schedule_catchup_s: int = Field(
        300, ge=0, alias="CORRAL_SCHEDULE_CATCHUP_S", description="a whole number of seconds"
    )

    @field_validator("sandbox_executor", mode="before")
    @classmethod
    def _executor_alias(cls, value: Any) -> Any:
        return parse_executor(value) if isinstance(value, str) else value

    @field_validator("egress_allow", "egress_deny", "allowed_imports", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("connectors_dir", mode="before")
    @classmethod
    def _colon_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(":") if part.strip()]
        return value

    @field_validator("allowed_imports")
    @classmethod
    def _only_modules_with_a_view(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in SAFE_MODULES:
                raise ValueError(
                    f"{name!r} has no safe view (modules like os, sys or socket reach the host); "
                    f"importable modules are {', '.join(sorted(SAFE_MODULES))}"
                )
        return value

    @model_validator(mode="after")
    def _heartbeat_bounds(self) -> Settings:
        if self.sandbox_heartbeat_timeout_ms < 2 * self.sandbox_heartbeat_interval_ms:
            raise ValueError(
                "SANDBOX_HEARTBEAT_TIMEOUT_MS must be at least twice "
                f"SANDBOX_HEARTBEAT_INTERVAL_MS ({self.sandbox_heartbeat_interval_ms} ms), "
                f"got {self.sandbox_heartbeat_timeout_ms}"
            )
        return self

    @property
    def executor(self) -> ExecutorKind:
        """The backend picked by SANDBOX_EXECUTOR, else WORKER_SANDBOX_ENABLED, else process."""
        if self.sandbox_executor is not None:
            return self.sandbox_executor
        return ExecutorKind.WORKER if self.worker_sandbox_enabled else ExecutorKind.PROCESS


def _one_line(error: ValidationError) -> str:
    """The first problem of a validation error as one line naming the variable."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:  # a model-level rule: its message already names the variables
        return f"corral: invalid configuration: {message}"
    field = Settings.model_fields.get(loc[0]) or next(
        (f for f in Settings.model_fields.values() if f.alias == loc[0]), None
    )
    name = field.alias if field is not None and field.alias else loc[0].upper()
    raw = os.environ.get(name, first.get("input"))
    expected = f"; expected {field.description}" if field is not None and field.description else ""
    return f"corral: {name}={raw!r} is invalid: {message}{expected}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; raise ConfigError with one line on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load_settings()


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again."""
    get_settings.cache_clear()
    return get_settings()
