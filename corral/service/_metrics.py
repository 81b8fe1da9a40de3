"""The service's Prometheus metrics (DESIGN §10). Labels are bounded: a workflow id, a
status, a queue state; never a run id or a node id."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from corral.runtime._events import DURATION_BUCKETS

# corral_runs_total{workflow,status} is counted in the records (every process's runs) and
# exposed by the API's /metrics: corral.service.api._routes.
RUN_DURATION = Histogram(
    "corral_run_duration_seconds",
    "Wall time of a run's execution by a worker.",
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "corral_run_queue_wait_seconds",
    "Time from a run's creation to its first start by a worker.",
    buckets=DURATION_BUCKETS,
)
QUEUE_JOBS = Gauge("corral_queue_jobs", "Runs in the queue, by state.", ["state"])
LEASE_RECLAIMS = Counter(
    "corral_lease_reclaims", "Lapsed leases taken back (their worker died or hung)."
)
WORKERS = Gauge("corral_workers", "Workers with a fresh heartbeat.")
SANDBOX_EXECUTIONS = Counter(
    "corral_sandbox_executions",
    "Executions through the API's sandbox endpoint, by executor and outcome.",
    ["executor", "outcome"],
)
BREAKER_STATE = Gauge(
    "corral_breaker_state", "Circuit breakers: 0 closed, 1 half-open, 2 open.", ["breaker"]
)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}


def runs_total(counts: dict[tuple[str, str], int]) -> CollectorRegistry:
    """corral_runs_total{workflow,status} from the records' counts, in a registry of its own
    (every process's runs, not only this one's)."""
    registry = CollectorRegistry()
    family = CounterMetricFamily(
        "corral_runs", "Runs finished, by workflow and status.", labels=["workflow", "status"]
    )
    for (workflow, status), count in sorted(counts.items()):
        family.add_metric([workflow, status], count)

    class _Runs(Collector):
        def collect(self) -> Iterator[CounterMetricFamily]:
            yield family

    registry.register(_Runs())
    return registry
