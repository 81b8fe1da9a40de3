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
    "Sandbox executions (API calls, workflow nodes, triggers), by executor and outcome.",
    ["executor", "outcome"],
)
BREAKER_STATE = Gauge(
    "corral_breaker_state", "Circuit breakers: 0 closed, 1 half-open, 2 open.", ["breaker"]
)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}


METRICS_PORT_ENV = "CORRAL_WORKER_METRICS_PORT"
METRICS_HOST_ENV = "CORRAL_WORKER_METRICS_HOST"


class MetricsServer:
    """This process's metrics (the default registry: sandbox executions, run durations,
    queue waits, lease reclaims, the runtime's node counters) in Prometheus' text format
    over HTTP, on a thread of its own: a standalone `corral worker`'s /metrics."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host)
        self.host, self.port = self._server.server_address[:2]

    @property
    def url(self) -> str:
        """Where it answers."""
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop answering and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


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
