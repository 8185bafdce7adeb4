"""`kubetune console` against a real kube-apiserver (tests/cluster) with the CRDs installed, in
headless Chromium: Apply from the Launch form (the operator's admission check first, its message
next to the field), the created FineTuneJob's page, and the Jobs table showing the status the
operator writes (written here through the status subresource, as the operator does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import Kubectl
from tests.test_console import _free_port, _shot, _start, browser, page  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "kt-console"


@pytest.fixture(scope="module")
def cluster_console(real_cluster: ControlPlane, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory):
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(REPO / "crds"))
    kubectl("create", "namespace", NAMESPACE)
    root = tmp_path_factory.mktemp("console-cluster")
    port = _free_port()
    argv = [sys.executable, "-m", "kubetune.trainer.cli.main", "console", "--port", str(port),
            "--runs-dir", str(root / "runs"), "--kubeconfig", str(real_cluster.admin_kubeconfig),
            "--namespace", NAMESPACE]
    process = _start(argv, f"http://127.0.0.1:{port}/jobs", root / "console.log")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_apply_from_the_form_then_list_and_status(cluster_console, kubectl: Kubectl, page) -> None:  # noqa: F811
    url = cluster_console
    page.goto(f"{url}/launch")
    page.fill("#f-name", "console-job")
    page.click("#apply-button")
    # the quickstart's data is a file on this machine: the operator's admission refuses it, on the field
    error = page.locator("#err-data-datasets-0-path")
    error.wait_for(state="visible", timeout=15000)
    assert "local path" in error.inner_text()
    page.fill("#f-data-datasets-0-path", "s3://demo/demo_alpaca.json")
    page.fill("#f-output-path", "s3://demo/outputs/console-job")
    page.locator("#f-output-path").blur()
    page.wait_for_function("document.getElementById('err-data-datasets-0-path').textContent.trim() === ''", timeout=15000)
    page.click("#apply-button")
    page.wait_for_url(f"{url}/cluster/{NAMESPACE}/FineTuneJob/console-job", timeout=30000)
    assert page.locator("#phase").inner_text() == "Pending"

    stored = json.loads(kubectl("-n", NAMESPACE, "get", "finetunejob", "console-job", "-o", "json").stdout)
    training = stored["spec"]["training"]
    assert training["data"]["datasets"][0]["path"] == "s3://demo/demo_alpaca.json"
    assert training["train"]["learningRate"] == 0.003 and training["method"] == "full"

    status = {"status": {"phase": "Running", "attempts": 1,
                         "progress": {"step": 3, "totalSteps": 10, "percent": 30, "loss": 1.5, "etaSeconds": 70},
                         "conditions": [{"type": "Ready", "status": "False", "reason": "Training",
                                         "message": "step 3 of 10", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    kubectl("-n", NAMESPACE, "patch", "finetunejob", "console-job", "--subresource=status", "--type=merge",
            "-p", json.dumps(status))
    page.goto(f"{url}/jobs?namespace={NAMESPACE}")
    row = page.locator('tr[data-name="console-job"]')
    assert row.get_attribute("data-phase") == "Running"
    assert "1.5000" in row.inner_text() and "3/10" in row.inner_text()
    _shot(page, "jobs-cluster")
    page.goto(f"{url}/cluster/{NAMESPACE}/FineTuneJob/console-job")
    assert page.locator("#phase").inner_text() == "Running"
    assert "step 3 of 10" in page.inner_text("main")
    _shot(page, "resource")
