"""The operator's Prometheus endpoint: resources by phase, reconcile latency and errors."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from kubetune.operator import metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, line_start: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_metrics_endpoint_reports_phases_latency_and_errors():
    for key in list(metrics._phases):  # operators run by earlier tests in this process recorded theirs
        metrics.record_phase(*key, None)
    port = free_port()
    server, _thread = metrics.serve(port, addr="127.0.0.1")
    try:
        metrics.record_phase("FineTuneJob", "metrics-test", "a", "Running")
        metrics.record_phase("FineTuneJob", "metrics-test", "b", "Running")
        metrics.record_phase("FineTuneJob", "metrics-test", "c", "Failed")
        metrics.record_phase("FineTuneJob", "metrics-test", "b", "Succeeded")  # a transition moves the count
        with metrics.timed_reconcile("FineTuneJob"):
            pass
        with pytest.raises(RuntimeError), metrics.timed_reconcile("FineTuneJob"):
            raise RuntimeError("API unavailable")
        text = scrape(port)
        assert sample(text, 'kubetune_operator_resources{kind="FineTuneJob",phase="Running"}') == 1
        assert sample(text, 'kubetune_operator_resources{kind="FineTuneJob",phase="Succeeded"}') == 1
        assert sample(text, 'kubetune_operator_resources{kind="FineTuneJob",phase="Failed"}') == 1
        assert sample(text, 'kubetune_operator_reconcile_seconds_count{kind="FineTuneJob"}') >= 2
        assert sample(text, 'kubetune_operator_reconcile_errors_total{kind="FineTuneJob"}') >= 1

        metrics.record_phase("FineTuneJob", "metrics-test", "a", None)  # deleted: no longer counted
        assert 'phase="Running"' not in scrape(port)
    finally:
        server.shutdown()
        for key in list(metrics._phases):
            metrics.record_phase(*key, None)
