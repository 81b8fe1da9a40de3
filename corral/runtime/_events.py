"""Actionable runtime events: one JSON log line each, and Prometheus counters.

Every failed attempt, retry, fallback, breaker transition and replay is an
event (DESIGN §7). The line goes to the `corral.events` logger (the service
sends it to stderr); fields are plain values and never hold credentials
(error messages have been through the sandbox's redaction).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import Counter, Histogram

logger = logging.getLogger("corral.events")

#: Connector calls take ~50 ms to seconds, runs up to half an hour: 0.05 s to 1800 s
#: (DESIGN §10), for every duration histogram of the runtime and the service.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

ATTEMPTS = Counter(
    "corral_node_attempts_total",
    "Node executions attempted, by outcome (ok or the error type).",
    ["connector", "function", "outcome"],
)
RETRIES = Counter(
    "corral_node_retries_total", "Attempts that were retried.", ["connector", "function", "error"]
)
FALLBACKS = Counter(
    "corral_node_fallbacks_total",
    "Calls that fell back to the generic executor.",
    ["connector", "function"],
)
REPLAYS = Counter(
    "corral_node_replays_total",
    "Node results replayed from the idempotency store.",
    ["connector", "function"],
)
BREAKER_TRANSITIONS = Counter(
    "corral_breaker_transitions_total",
    "Circuit breaker state changes.",
    ["connector", "function", "from_state", "to_state"],
)
DURATION = Histogram(
    "corral_node_duration_seconds",
    "Wall time of node executions (each attempt), by executor.",
    ["connector", "function", "executor"],
    buckets=DURATION_BUCKETS,
)


_PLAIN = (str, int, float, bool, type(None))


def emit(event: str, **fields: Any) -> None:
    """Log one event as a JSON line: `{"event": "corral.node.retry", "ts": ..., ...}`. The
    log record carries the event as a dict too, as its `event` attribute (for handlers that
    keep events, such as the service worker's, without parsing the line again)."""
    if logger.isEnabledFor(logging.INFO):
        record = {"event": f"corral.{event}", "ts": round(time.time(), 3), **fields}
        line = json.dumps(record, default=str, separators=(",", ":"))
        if not all(isinstance(value, _PLAIN) for value in fields.values()):
            record = json.loads(line)  # as the line has it: every value JSON
        logger.info(line, extra={"event": record})
