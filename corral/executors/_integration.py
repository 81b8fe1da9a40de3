"""IntegrationManager: one connector call, bespoke handler first, generic HTTP as fallback.

Host side. The payload is validated against the operation's params contract
before anything runs. The bespoke handler runs in NodeSandbox, with the
connection and the definition's request description in its context; when
there is none, or it says it is not implemented (NotImplementedError, or an
error whose message starts with "Function ") before sending any request, and
GENERIC_EXECUTOR_ENABLED is on, the call goes through GenericExecutor, in the
same sandbox. With the flag
off the handler's error surfaces unchanged, and a missing handler is
`not_supported`.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

from corral._exceptions import CodeError, InvalidInput, NotSupported
from corral.config import FLAGS, Flags
from corral.executors._catalog import ConnectorFramework
from corral.executors._generic import ENTRY_POINT, GENERIC_SOURCE, generic_request
from corral.sandbox import ExecutionResult, Limits, NodeSandbox

#: A handler failing like this has not implemented the function: the generic path may.
_NOT_IMPLEMENTED = re.compile(r"^(NotImplementedError\b|(\w+: )?Function\b)")
MIN_SECRET_CHARS = 4  # shorter credential values (a region, a flag) would mask everyday text


@dataclass(frozen=True)
class IntegrationResult:
    """What a connector call returned, which executor ran it, and why it fell back."""

    output: Any
    executor: Literal["bespoke", "generic"]
    fallback_reason: str | None
    execution: ExecutionResult


def credential_secrets(connection: dict[str, Any] | None) -> list[str]:
    """Every credential value of a connection (nested ones too) as a string: the secrets of
    its executions. Values shorter than MIN_SECRET_CHARS are left out."""
    found: list[str] = []
    base = (connection or {}).get("baseUrl")
    if isinstance(base, str) and "@" in base:  # credentials in the URL are credentials
        userinfo = urllib.parse.urlsplit(base).netloc.rpartition("@")[0]
        found += [part for part in (userinfo, *userinfo.split(":", 1)) if len(part) >= 4]
    pending = [((connection or {}).get("credentials") or {})]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif item is not None and not isinstance(item, bool) and len(str(item)) >= MIN_SECRET_CHARS:
            found.append(str(item))
    return found


class IntegrationManager:
    """Runs connector functions in the sandbox: bespoke, or generic under the flag."""

    def __init__(
        self, framework: ConnectorFramework, sandbox: NodeSandbox, *, flags: Flags = FLAGS
    ) -> None:
        self.framework = framework
        self.sandbox = sandbox
        self.flags = flags

    async def execute(
        self,
        app: str,
        function: str,
        params: dict[str, Any],
        connection: dict[str, Any] | None = None,
        *,
        timeout_ms: int | None = None,
        limits: Limits | None = None,
    ) -> IntegrationResult:
        """Validate `params`, then run `app`.`function` (raises the SandboxError it ended
        with; InvalidInput before anything ran; NotSupported when nothing can run it)."""
        connector = self.framework.connector(app)
        operation = connector.operation(function)
        operation.validate(params)
        if connection is not None and not isinstance(connection, dict):
            raise InvalidInput(f"the connection of {connector.id} must be a JSON object")
        context = {
            "connection": connection or {},
            "request": generic_request(connector, operation),  # the definition's side
        }
        secrets = credential_secrets(connection)
        run: dict[str, Any] = {"params": params, "secrets": secrets, "limits": limits}
        if timeout_ms is not None:
            run["timeout_ms"] = timeout_ms
        handler = connector.handler(operation.id)
        failure: CodeError | None = None
        if handler is not None:
            try:
                result = await self.sandbox.execute(
                    handler, entry_point=operation.id, context=context, **run
                )
                return IntegrationResult(result.output, "bespoke", None, result)
            except CodeError as exc:
                # Not implemented, and nothing sent yet: the generic path may run it (when
                # the definition allows it) without repeating a request.
                usage = exc.usage
                if not _NOT_IMPLEMENTED.match(exc.message) or (usage and usage.http_requests):
                    raise
                failure = exc
        reason = (
            f"the bespoke handler is not implemented: {failure.message}"
            if failure is not None
            else "no bespoke handler"
        )
        if not self.flags.GENERIC_EXECUTOR_ENABLED:
            if failure is not None:
                raise failure
            raise NotSupported(
                f"{connector.id}.{operation.id} has no bespoke handler; set "
                "GENERIC_EXECUTOR_ENABLED=true to run it through the generic HTTP path"
            )
        if not operation.has_http_metadata:
            raise NotSupported(
                f"{connector.id}.{operation.id}: {reason}, and its definition has no "
                "method and endpoint for the generic path"
            )
        result = await self.sandbox.execute(
            GENERIC_SOURCE, entry_point=ENTRY_POINT, context=context, **run
        )
        return IntegrationResult(result.output, "generic", reason, result)
