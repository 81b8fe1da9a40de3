"""NodeSandbox: the one entry point for running connector code under limits."""

from __future__ import annotations

import asyncio
import json
import keyword
import warnings
from collections.abc import Collection, Iterable
from types import TracebackType
from typing import Any

from corral._exceptions import Aborted, ConfigError, InvalidInput, LimitExceeded, SandboxCrash
from corral._warnings import warn_once
from corral.config import ExecutorKind, Settings, get_settings, parse_executor
from corral.sandbox._limits import Limits
from corral.sandbox._process import ProcessBackend
from corral.sandbox._result import ExecutionResult
from corral.sandbox._supervisor import ExecutionRequest
from corral.sandbox._workers import WorkerBackend

DEFAULT_TIMEOUT_MS = 15_000  # a connector call that takes longer is hung, not slow
#: How to raise the limit behind each error type: the Python API's argument, then the env var.
RAISE_LIMIT = {
    "cpu_limit": ("Limits(max_cpu_ms=...)", "SANDBOX_MAX_CPU_MS"),
    "memory_limit": ("Limits(max_memory_mb=...)", "SANDBOX_MAX_MEMORY_MB"),
    "timeout": ("execute(timeout_ms=...)",),
}
#: The key of the once-per-process warning about executions without a memory limit.
NO_MEMORY_LIMIT = "no-memory-limit"
NO_MEMORY_LIMIT_MESSAGE = (
    "executions have no memory limit; set SANDBOX_MAX_MEMORY_MB or pass Limits(max_memory_mb=...)"
)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, int | float) else "not JSON")


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class NodeSandbox:
    """Runs untrusted connector code in a sandbox with hard limits.

    The backend and the default limits come from the environment (DESIGN §2)
    unless given. Use it as a (async) context manager or call `close()`.
    """

    def __init__(
        self,
        executor: str | None = None,
        limits: Limits | None = None,
        *,
        settings: Settings | None = None,
        _unsafe_layers_off: Collection[str] = (),
    ) -> None:
        self._settings = settings if settings is not None else get_settings()
        try:
            kind = parse_executor(executor) if executor is not None else self._settings.executor
        except ValueError as exc:
            raise ConfigError(f"executor={executor!r} is invalid: {exc}") from None
        self._limits = Limits.from_settings(self._settings).merged(limits)
        backend = WorkerBackend if kind is ExecutorKind.WORKER else ProcessBackend
        # `_unsafe_layers_off` switches layers off ("language": connector code runs as plain
        # Python; "seccomp": no system-call filter). corral's own tests use it to prove that
        # each layer holds on its own. Never use it for anything else.
        self._backend: ProcessBackend | WorkerBackend = backend(
            self._settings, unsafe_layers_off=frozenset(_unsafe_layers_off)
        )
        # Only once the settings proved valid: a bad one is the one line a user sees.
        if self._limits.max_memory_mb is None:
            warn_once(NO_MEMORY_LIMIT, NO_MEMORY_LIMIT_MESSAGE)

    @property
    def executor(self) -> str:
        """The backend this sandbox runs: `process` or `worker`."""
        return self._backend.name

    @property
    def limits(self) -> Limits:
        """The default limits of every execution (each call may override fields)."""
        return self._limits

    @property
    def isolation(self) -> str:
        """How limits are enforced: `cgroup-v1`, `cgroup-v2` or `degraded: <why>`."""
        return self._backend.isolation

    def abort(self, reason: str) -> int:
        """Kill every execution in flight (from any thread or a signal handler); each raises
        `Aborted` with `reason` and the logs and usage it had. The number aborted: 0 when
        none had started yet (cancel the awaiting task to stop those)."""
        return self._backend.abort(reason)

    def start(self) -> None:
        """Warm the sandbox now (start the zygote) instead of on first use."""
        self._backend.start()

    def _request(
        self,
        code: str,
        entry_point: str,
        params: Any,
        context: Any,
        timeout_ms: int,
        limits: Limits | None,
        secrets: Iterable[str] | None,
    ) -> ExecutionRequest:
        if not isinstance(code, str):
            raise InvalidInput(f"code must be a str, not {type(code).__name__}")
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > self._settings.max_code_bytes:
            raise InvalidInput(
                f"the code is {size} bytes, over the {self._settings.max_code_bytes} byte cap "
                "(CORRAL_MAX_CODE_BYTES)"
            )
        is_name = isinstance(entry_point, str) and entry_point.isidentifier()
        if not is_name or keyword.iskeyword(entry_point):
            raise InvalidInput(f"entry point {entry_point!r} is not a Python function name")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ConfigError(f"timeout_ms={timeout_ms!r} is invalid: expected a positive integer")
        if not isinstance(params, dict):
            raise InvalidInput(f"params must be a JSON object, not {_json_kind(params)}")
        for name, value in (("params", params), ("context", context)):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"{name} must be JSON-serialisable: {exc}") from None
        if isinstance(secrets, str):
            raise ConfigError("secrets must be a list of strings, not one string")
        secret_values = tuple(str(secret) for secret in secrets or ())
        return ExecutionRequest(
            code=code,
            entry_point=entry_point,
            params=params,
            context=context,
            timeout_ms=timeout_ms,
            limits=self._limits.merged(limits).resolve(),
            secrets=secret_values,
        )

    async def execute(
        self,
        code: str,
        entry_point: str = "run",
        params: Any = None,
        context: Any = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        limits: Limits | None = None,
        secrets: Iterable[str] | None = None,
    ) -> ExecutionResult:
        """Run `entry_point(params, context)` of `code` in the sandbox.

        Returns an ExecutionResult or raises a SandboxError subclass whose
        `.type` is one of the stable error types. Cancelling the awaiting task
        kills the execution and cleans up before the cancellation propagates.
        """
        request = self._request(
            code,
            entry_point,
            {} if params is None else params,
            {} if context is None else context,
            timeout_ms,
            limits,
            secrets,
        )
        try:
            return await self._backend.execute(request)
        except SandboxCrash as error:
            if not self._backend.closed:
                raise
            # close() stopped the zygote or the worker this execution was starting on.
            raise Aborted("the sandbox was closed before the execution started") from error
        except LimitExceeded as error:
            advice = RAISE_LIMIT.get(error.type)
            if advice is not None:
                error.message = f"{error.message} (raise it with {' or '.join(advice)})"
                error.args = (error.message,)
            raise

    def execute_sync(self, code: str, **kwargs: Any) -> ExecutionResult:
        """`execute`, blocking; not for use inside a running event loop."""
        if _in_event_loop():
            raise ConfigError(
                "execute_sync() was called inside an event loop; await execute() instead"
            )
        return asyncio.run(self.execute(code, **kwargs))

    def close(self) -> None:
        """Abort executions in flight, stop the sandbox processes, remove cgroups."""
        self._backend.close()

    def __enter__(self) -> NodeSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> NodeSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None and not backend.closed:
            warnings.warn("NodeSandbox was not closed", ResourceWarning, stacklevel=1)
            backend.close()

    def __repr__(self) -> str:
        state = "closed" if self._backend.closed else "open"
        return f"<NodeSandbox executor={self.executor} isolation={self.isolation!r} {state}>"
