"""Deployment settings read from environment variables (DESIGN §2).

`Settings` is the one source of every variable's name, default and check: each field
carries its `Setting` (the variable, how its text becomes a value, what it expects).
Plain Python on purpose: every `corral` command reads the settings first, and a
validation library's import and schema build took most of a short command's start-up.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class SecretStr:
    """A secret setting: shown as `**********`, read with `get_secret_value()`."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        """The secret itself."""
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "SecretStr('**********')"

    __str__ = __repr__


# -- how a variable's text becomes a value: each raises ValueError saying what is wrong ----

Parse = Callable[[Any], Any]


def _whole(minimum: int = 1, maximum: int | None = None) -> Parse:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("not a whole number")
        if isinstance(value, str):
            text = value.strip()
            if not text.lstrip("+-").isdigit():
                raise ValueError("not a whole number")
            value = int(text)
        if not isinstance(value, int):
            raise ValueError("not a whole number")
        if value < minimum:
            raise ValueError(f"below {minimum}" if minimum > 1 else "not positive")
        if maximum is not None and value > maximum:
            raise ValueError(f"above {maximum}")
        return value

    return parse


def _positive_number(value: Any) -> float:
    number = _number(value)
    if not number > 0:
        raise ValueError("not a positive number")
    return number


def _number(value: Any) -> float:
    """A finite number, 0 or more."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("not a number") from None
    if isinstance(value, bool) or not 0 <= number < float("inf"):
        raise ValueError("not a finite number, 0 or more")
    return number


_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError("not a boolean")


def _choice(*choices: str) -> Parse:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return text

    return parse


def _executor(value: Any) -> ExecutorKind:
    if isinstance(value, ExecutorKind):
        return value
    if str(value).strip().lower() not in _EXECUTOR_ALIASES:
        raise ValueError("unknown executor")  # the setting's `expected` lists the names
    return parse_executor(str(value))


def _cgroup_mode(value: Any) -> CgroupMode:
    return CgroupMode(_choice(*CgroupMode)(value))


def _text(value: Any) -> str:
    return str(value)


def _cgroup_path(value: Any) -> str:
    if ".." in str(value).split("/"):
        raise ValueError("'..' would leave the cgroup hierarchy")
    return str(value)


def _separated(separator: str) -> Parse:
    def parse(value: Any) -> list[str]:
        parts = value.split(separator) if isinstance(value, str) else list(value)
        return [str(part).strip() for part in parts if str(part).strip()]

    return parse


def _importable(value: Any) -> list[str]:
    names = _separated(",")(value)
    for name in names:
        if name not in SAFE_MODULES:
            raise ValueError(
                f"{name!r} has no safe view (modules like os, sys or socket reach the host); "
                f"importable modules are {', '.join(sorted(SAFE_MODULES))}"
            )
    return names


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, how its text becomes a value, what it expects."""

    variable: str
    parse: Parse
    expected: str


def _setting(
    variable: str, parse: Parse, expected: str, default: Any = None, *, factory: Any = None
) -> Any:
    """A field of Settings read from `variable`."""
    metadata = {"setting": Setting(variable, parse, expected)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_WHOLE_MS = "a positive whole number of milliseconds"


@dataclass(frozen=True)
class Settings:
    """Every setting of a deployment; each field is read from the env var its Setting names."""

    sandbox_executor: ExecutorKind | None = _setting(
        "SANDBOX_EXECUTOR", _executor,
        "process (also proc, child_process, processes) or worker "
        "(also worker_thread, worker-threads, thread)",
    )  # fmt: skip
    worker_sandbox_enabled: bool = _setting(
        "WORKER_SANDBOX_ENABLED", _boolean, "true or false", False
    )
    sandbox_max_cpu_ms: int | None = _setting(
        "SANDBOX_MAX_CPU_MS", _whole(),
        "a positive whole number of milliseconds of CPU time; unset for no limit",
    )  # fmt: skip
    sandbox_cpu_quota_ms: int | None = _setting(
        "SANDBOX_CPU_QUOTA_MS", _whole(),
        "a positive whole number of CPU milliseconds per 100 ms period (100 = one core); "
        "unset for no throttle",
    )  # fmt: skip
    sandbox_max_memory_mb: int | None = _setting(
        "SANDBOX_MAX_MEMORY_MB", _whole(),
        "a positive whole number of megabytes; unset for no limit",
    )  # fmt: skip
    sandbox_cgroup_root: str | None = _setting(
        "SANDBOX_CGROUP_ROOT", _cgroup_path,
        "a cgroup path such as 'corral' or '/system.slice/corral'",
    )  # fmt: skip
    sandbox_heartbeat_interval_ms: int = _setting(
        "SANDBOX_HEARTBEAT_INTERVAL_MS", _whole(25),
        "a whole number of milliseconds, at least 25", 500,
    )  # fmt: skip
    sandbox_heartbeat_timeout_ms: int = _setting(
        "SANDBOX_HEARTBEAT_TIMEOUT_MS", _whole(),
        "a whole number of milliseconds, at least twice SANDBOX_HEARTBEAT_INTERVAL_MS", 3000,
    )  # fmt: skip
    generic_executor_enabled: bool = _setting(
        "GENERIC_EXECUTOR_ENABLED", _boolean, "true or false", False
    )
    enable_inline_worker: bool | None = _setting("ENABLE_INLINE_WORKER", _boolean, "true or false")
    state_dir: Path = _setting("CORRAL_STATE_DIR", Path, "a directory path", Path(".corral"))
    redis_url: str | None = _setting("CORRAL_REDIS_URL", _text, "a redis:// or rediss:// URL")
    egress_allow: list[str] = _setting(
        "CORRAL_EGRESS_ALLOW", _separated(","),
        "comma-separated domains (*.example.com) and CIDRs", factory=list,
    )  # fmt: skip
    egress_deny: list[str] = _setting(
        "CORRAL_EGRESS_DENY", _separated(","),
        "comma-separated domains (*.example.com) and CIDRs", factory=list,
    )  # fmt: skip
    egress_default: str = _setting(
        "CORRAL_EGRESS_DEFAULT", _choice("allow", "deny"), "allow or deny", "allow"
    )
    http_timeout_s: float = _setting(
        "CORRAL_HTTP_TIMEOUT_S", _positive_number,
        "a positive number of seconds for one brokered HTTP request", 30.0,
    )  # fmt: skip
    http_max_response_bytes: int = _setting(
        "CORRAL_HTTP_MAX_RESPONSE_BYTES", _whole(), "a positive whole number of bytes",
        10 << 20,  # 10 MiB: API responses, not downloads
    )  # fmt: skip
    http_max_requests: int = _setting(
        "CORRAL_HTTP_MAX_REQUESTS", _whole(),
        "a positive whole number of requests per execution",
        100,  # per execution: a connector pages through an API, it does not crawl it
    )  # fmt: skip
    http_max_redirects: int = _setting(
        "CORRAL_HTTP_MAX_REDIRECTS", _whole(0),
        "a whole number of redirects the host follows, 0 for none", 5,
    )  # fmt: skip
    sandbox_uid: int = _setting(
        "CORRAL_SANDBOX_UID", _whole(1, (1 << 32) - 3),
        "the first of two unused host uids (and gids) sandbox processes run as",
        0x5F000000,  # far above any account a distribution creates
    )  # fmt: skip
    connectors_dir: list[str] = _setting(
        "CORRAL_CONNECTORS_DIR", _separated(":"),
        "colon-separated catalog folders, searched before the shipped one", factory=list,
    )  # fmt: skip
    retry_max_attempts: int = _setting(
        "CORRAL_RETRY_MAX_ATTEMPTS", _whole(), "a positive whole number of attempts", 3
    )
    retry_initial_ms: int = _setting("CORRAL_RETRY_INITIAL_MS", _whole(), _WHOLE_MS, 200)
    retry_max_ms: int = _setting("CORRAL_RETRY_MAX_MS", _whole(), _WHOLE_MS, 10_000)
    breaker_failure_threshold: int = _setting(
        "CORRAL_BREAKER_FAILURE_THRESHOLD", _whole(),
        "a positive whole number of consecutive failed executions", 5,
    )  # fmt: skip
    breaker_reset_ms: int = _setting("CORRAL_BREAKER_RESET_MS", _whole(), _WHOLE_MS, 30_000)
    idempotency_ttl_s: int = _setting(
        "CORRAL_IDEMPOTENCY_TTL_S", _whole(), "a positive whole number of seconds", 86_400
    )
    # 30 days: a cursor keeps older items out anyway; keys only need to outlive the window
    # in which an API still lists an item it returned before.
    trigger_seen_ttl_s: int = _setting(
        "CORRAL_TRIGGER_SEEN_TTL_S", _whole(), "a positive whole number of seconds", 30 * 86_400
    )
    api_token: SecretStr | None = _setting("CORRAL_API_TOKEN", SecretStr, "a bearer token")
    cgroups: CgroupMode = _setting(
        "CORRAL_CGROUPS", _cgroup_mode, "auto, required or off", CgroupMode.AUTO
    )
    allowed_imports: list[str] = _setting(
        "CORRAL_ALLOWED_IMPORTS", _importable,
        "comma-separated modules among those with a safe view",
        factory=lambda: list(DEFAULT_ALLOWED_IMPORTS),
    )  # fmt: skip
    max_output_bytes: int = _setting(
        "CORRAL_MAX_OUTPUT_BYTES", _whole(), "a positive whole number of bytes",
        1 << 20,  # 1 MiB of JSON: connector results are records, not files
    )  # fmt: skip
    max_log_bytes: int = _setting(
        "CORRAL_MAX_LOG_BYTES", _whole(), "a positive whole number of bytes",
        256 << 10,  # 256 KiB of log text per execution stops a log flood early
    )  # fmt: skip
    worker_pool_size: int = _setting(
        "CORRAL_WORKER_POOL_SIZE", _whole(), "a positive whole number of worker processes",
        factory=lambda: os.cpu_count() or 1,  # one worker per core keeps them all busy
    )  # fmt: skip
    worker_max_executions: int = _setting(
        "CORRAL_WORKER_MAX_EXECUTIONS", _whole(),
        "a positive whole number of executions before a worker is replaced",
        1000,  # bounds what a long-lived interpreter accumulates (caches, fragmentation)
    )  # fmt: skip
    worker_max_memory_mb: int = _setting(
        "CORRAL_WORKER_MAX_MEMORY_MB", _whole(), "a positive whole number of megabytes",
        256,  # growth of a worker's resident memory past its start before it is replaced
    )  # fmt: skip
    max_code_bytes: int = _setting(
        "CORRAL_MAX_CODE_BYTES", _whole(), "a positive whole number of bytes",
        512 << 10,  # connector sources are a few KiB; this bounds compile time and memory
    )  # fmt: skip
    # -- the service (corral api / worker / scheduler / stack) --------------------------
    api_host: str = _setting("CORRAL_API_HOST", _text, "an address to bind", "127.0.0.1")
    api_port: int = _setting(
        "CORRAL_API_PORT", _whole(0, 65535), "a TCP port (0: any free one)", 8080
    )
    api_max_body_bytes: int = _setting(
        "CORRAL_API_MAX_BODY_BYTES", _whole(), "a positive whole number of bytes",
        1 << 20,  # 1 MiB: a workflow or a connector source; more is a mistake or an attack
    )  # fmt: skip
    worker_concurrency: int = _setting(
        "CORRAL_WORKER_CONCURRENCY", _whole(), "a positive whole number of runs",
        4,  # runs mostly wait on connector calls; 4 keeps 2 cores busy without piling up
    )  # fmt: skip
    worker_grace_s: float = _setting(
        "CORRAL_WORKER_GRACE_S", _positive_number, "a positive number of seconds",
        30.0,  # a node's default time-out is 15 s: most runs finish; the rest are handed back
    )  # fmt: skip
    lease_s: float = _setting(
        "CORRAL_LEASE_S", _positive_number, "a positive number of seconds",
        # How long a worker's hold on a run (and a process's on a node it executes) lasts
        # unrenewed; renewed every third of it: a dead worker's runs restart within ~1-2x.
        30.0,
    )  # fmt: skip
    max_reclaims: int = _setting(
        "CORRAL_MAX_RECLAIMS", _whole(0),
        "a whole number of times a lapsed lease is taken back, 0 or more",
        2,  # a run that kills its worker three times would kill the next one too
    )  # fmt: skip
    worker_heartbeat_s: float = _setting(
        "CORRAL_WORKER_HEARTBEAT_S", _positive_number, "a positive number of seconds", 5.0
    )
    encryption_keys: SecretStr | None = _setting(
        "CORRAL_ENCRYPTION_KEYS", SecretStr,
        "comma-separated Fernet keys (the first encrypts, all decrypt)",
    )  # fmt: skip
    key_rotation_interval_s: int | None = _setting(
        "CORRAL_KEY_ROTATION_INTERVAL_S", _whole(),
        "a positive whole number of seconds; unset: rotate only by hand",
    )  # fmt: skip
    schedule_catchup_s: int = _setting(
        "CORRAL_SCHEDULE_CATCHUP_S", _whole(0), "a whole number of seconds", 300
    )
    run_retention_days: float = _setting(
        "CORRAL_RUN_RETENTION_DAYS", _number,
        "a number of days, 0 or more (0: keep finished runs forever)", 30.0,
    )  # fmt: skip
    worker_metrics_port: int | None = _setting(
        "CORRAL_WORKER_METRICS_PORT", _whole(0, 65535),
        "a TCP port (0: any free one); unset: a standalone worker serves no /metrics",
    )  # fmt: skip
    worker_metrics_host: str = _setting(
        "CORRAL_WORKER_METRICS_HOST", _text, "an address to bind", "127.0.0.1"
    )

    def __post_init__(self) -> None:
        if self.sandbox_heartbeat_timeout_ms < 2 * self.sandbox_heartbeat_interval_ms:
            raise ConfigError(
                "corral: invalid configuration: SANDBOX_HEARTBEAT_TIMEOUT_MS must be at least "
                f"twice SANDBOX_HEARTBEAT_INTERVAL_MS ({self.sandbox_heartbeat_interval_ms} "
                f"ms), got {self.sandbox_heartbeat_timeout_ms}"
            )

    @property
    def executor(self) -> ExecutorKind:
        """The backend picked by SANDBOX_EXECUTOR, else WORKER_SANDBOX_ENABLED, else process."""
        if self.sandbox_executor is not None:
            return self.sandbox_executor
        return ExecutorKind.WORKER if self.worker_sandbox_enabled else ExecutorKind.PROCESS


#: Every setting by its variable's name, with the field it fills.
SETTINGS: dict[str, tuple[str, Setting]] = {
    f.metadata["setting"].variable: (f.name, f.metadata["setting"])
    for f in dataclasses.fields(Settings)
}


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (names in any letter case; empty means unset),
    `overrides` (by variable name) winning; raise ConfigError with one line on a bad value."""
    given: dict[str, Any] = {}
    by_upper = {variable.upper(): variable for variable in SETTINGS}
    for name, value in os.environ.items():
        variable = by_upper.get(name.upper())
        if variable is not None and value != "":
            given[variable] = value
    given.update((name, value) for name, value in overrides.items() if name in SETTINGS)
    values = {}
    for variable, raw in given.items():
        name, setting = SETTINGS[variable]
        if raw is None:
            values[name] = None
            continue
        try:
            values[name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(
                f"corral: {variable}={raw!r} is invalid: {exc}; expected {setting.expected}"
            ) from None
    return Settings(**values)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load_settings()


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again."""
    get_settings.cache_clear()
    return get_settings()
