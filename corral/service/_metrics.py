"""The service's Prometheus metrics (DESIGN §10). Labels are bounded: a workflow id, a
status, a queue state; never a run id or a node id."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from corral.runtime._events import DURATION_BUCKETS

# corral_runs_total, corral_queue_jobs, corral_workers and corral_breaker_state are read
# from the shared state when the API's /metrics is scraped: state_registry().
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
LEASE_RECLAIMS = Counter(
    "corral_lease_reclaims", "Lapsed leases taken back (their worker died or hung)."
)
SANDBOX_EXECUTIONS = Counter(
    "corral_sandbox_executions",
    "Sandbox executions (API calls, workflow nodes, triggers), by executor and outcome.",
    ["executor", "outcome"],
)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}

# `corral stack` points its children at one directory (prometheus_client's multiprocess
# mode), so that the API's /metrics sums every child's counters, the worker's included.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def process_registry() -> CollectorRegistry:
    """The counters and histograms to expose: this process's (the default registry), or,
    in multiprocess mode, those of every process writing to the same directory."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


METRICS_PORT_ENV = "CORRAL_WORKER_METRICS_PORT"
METRICS_HOST_ENV = "CORRAL_WORKER_METRICS_HOST"


class MetricsServer:
    """This process's metrics (the default registry: sandbox executions, run durations,
    queue waits, lease reclaims, the runtime's node counters) in Prometheus' text format
    over HTTP, on a thread of its own: a standalone `corral worker`'s /metrics."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=process_registry())
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


def state_registry(
    runs: dict[tuple[str, str], int],
    queue: dict[str, int],
    fresh_workers: int,
    breakers: dict[str, str],
) -> CollectorRegistry:
    """What the shared state says at scrape time, read by the API from the records, the
    queue and the store (every process's, not only this one's): corral_runs_total{workflow,
    status}, corral_queue_jobs{state}, corral_workers, corral_breaker_state{breaker}."""
    families: list[Metric] = []
    finished = CounterMetricFamily(
        "corral_runs", "Runs finished, by workflow and status.", labels=["workflow", "status"]
    )
    for (workflow, status), count in sorted(runs.items()):
        finished.add_metric([workflow, status], count)
    families.append(finished)
    jobs = GaugeMetricFamily("corral_queue_jobs", "Runs in the queue, by state.", labels=["state"])
    for state, count in sorted(queue.items()):
        jobs.add_metric([state], count)
    families.append(jobs)
    families.append(GaugeMetricFamily("corral_workers", "Workers with a fresh heartbeat.",
                                      value=fresh_workers))  # fmt: skip
    states = GaugeMetricFamily(
        "corral_breaker_state", "Circuit breakers: 0 closed, 1 half-open, 2 open.",
        labels=["breaker"],
    )  # fmt: skip
    for name, state in sorted(breakers.items()):
        states.add_metric([name], BREAKER_LEVELS[state])
    families.append(states)

    class _State(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families

    registry = CollectorRegistry()
    registry.register(_State())
    return registry
