"""The operator's own Prometheus metrics: resources by phase, reconcile latency and errors.

Served on `--metrics-port` (the chart's metrics Service / ServiceMonitor scrape it). A private
registry keeps them apart from anything else imported into the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_seconds", "Time to observe, decide and act for one resource.", ["kind"],
    registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "kubetune_operator_reconcile_errors_total", "Reconciles that raised (kopf retries them).", ["kind"],
    registry=REGISTRY,
)
RESOURCES = Gauge(
    "kubetune_operator_resources", "kubetune resources by kind and phase.", ["kind", "phase"], registry=REGISTRY,
)

_phases: dict[tuple[str, str, str], str] = {}
_guard = threading.Lock()


@contextmanager
def timed_reconcile(kind: str) -> Iterator[None]:
    """Measure one reconcile; count it as an error if it raises."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)


def record_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    """Remember a resource's phase (None forgets it, e.g. once it is deleted) and refresh the gauge."""
    with _guard:
        key = (kind, namespace, name)
        if phase:
            _phases[key] = phase
        else:
            _phases.pop(key, None)
        counts: dict[tuple[str, str], int] = {}
        for (k, _ns, _n), p in _phases.items():
            counts[(k, p)] = counts.get((k, p), 0) + 1
        RESOURCES.clear()
        for (k, p), count in counts.items():
            RESOURCES.labels(k, p).set(count)


def serve(port: int, addr: str = "0.0.0.0"):
    """Start the /metrics HTTP server in a background thread; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=REGISTRY)
