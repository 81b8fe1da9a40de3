"""The service's sandbox: a NodeSandbox that counts every execution it runs in
`corral_sandbox_executions_total{executor,outcome}` (DESIGN §10): the API's
/api/sandbox/execute and every workflow node or trigger a worker runs alike."""

from __future__ import annotations

import asyncio
from typing import Any

from corral._exceptions import InvalidInput, SandboxError
from corral.sandbox import ExecutionResult, NodeSandbox
from corral.service import _metrics as metrics


class CountingSandbox(NodeSandbox):
    """A NodeSandbox whose executions are counted by executor (process or worker) and
    outcome (`ok`, the error type, or `cancelled`). Calls refused before anything ran (bad
    code, bad params) are not executions and are not counted."""

    async def execute(self, code: str, *args: Any, **kwargs: Any) -> ExecutionResult:
        """NodeSandbox.execute, counted."""
        try:
            result = await super().execute(code, *args, **kwargs)
        except SandboxError as error:
            if not isinstance(error, InvalidInput):
                metrics.SANDBOX_EXECUTIONS.labels(error.executor or self.executor, error.type).inc()
            raise
        except asyncio.CancelledError:
            metrics.SANDBOX_EXECUTIONS.labels(self.executor, "cancelled").inc()
            raise
        metrics.SANDBOX_EXECUTIONS.labels(result.executor, "ok").inc()
        return result
