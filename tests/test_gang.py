"""Gang scheduling (`spec.gang`, #20 item 2): the PodGroup for the coscheduling plugin or Volcano,
created before the Job, and the pods that join it. Pure rendering and decisions here; the real
API server accepts both PodGroups under their own CRDs and the operator creates them in
tests/test_operator_real.py (test_gang_scheduling_creates_the_pod_group_before_the_job)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.preview import render_manifest
from kubetune.operator.training.decide import Observed, reconcile
from kubetune.operator.validation import validate_resource
from kubetune.trainer.api.errors import SpecErrors

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetunejob-gang.yaml"


def _cr(**gang: Any) -> dict[str, Any]:
    """The example with these gang settings, without its prepare step (the gang's Job first)."""
    cr = yaml.safe_load(EXAMPLE.read_text())
    cr["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    cr["spec"]["gang"] = gang
    cr["spec"]["training"]["data"]["cache"] = "off"
    return cr


def _created(cr: dict[str, Any], observed: Observed | None = None) -> list[dict[str, Any]]:
    return reconcile(cr, observed or Observed(secret_found=True)).create


def test_coscheduling_pod_group_comes_before_the_job_and_the_pods_join_it() -> None:
    created = _created(_cr(scheduler="coscheduling", scheduleTimeoutSeconds=600))
    kinds = [o["kind"] for o in created]
    assert kinds.index("PodGroup") < kinds.index("Job"), kinds
    group = next(o for o in created if o["kind"] == "PodGroup")
    job = next(o for o in created if o["kind"] == "Job")
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {"minMember": 2, "minResources": {"nvidia.com/gpu": "16"}, "scheduleTimeoutSeconds": 600}
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == group["metadata"]["name"]
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert job["spec"]["parallelism"] == group["spec"]["minMember"]


def test_volcano_pod_group_carries_queue_and_priority_and_the_pods_an_annotation() -> None:
    cr = _cr(scheduler="volcano", queue="research", schedulerName="volcano-gpu")
    cr["spec"]["priorityClassName"] = "training-high"
    created = _created(cr)
    group = next(o for o in created if o["kind"] == "PodGroup")
    pod = next(o for o in created if o["kind"] == "Job")["spec"]["template"]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {"minMember": 2, "minResources": {"nvidia.com/gpu": "16"}, "queue": "research",
                             "priorityClassName": "training-high"}
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group["metadata"]["name"]
    assert "scheduling.x-k8s.io/pod-group" not in pod["metadata"]["labels"]
    assert pod["spec"]["schedulerName"] == "volcano-gpu"


def test_every_restart_recreates_a_missing_pod_group_before_its_job() -> None:
    cr = _cr(scheduler="coscheduling")
    first = reconcile(cr, Observed(secret_found=True))
    cr = {**cr, "status": first.status}
    job = next(o for o in first.create if o["kind"] == "Job")
    failed = {**job, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                "message": "pod 1 failed"}]}}
    kinds = {o["kind"]: o for o in first.create}
    plan = reconcile(cr, Observed(jobs=[failed], config_map=kinds["ConfigMap"], service=kinds["Service"]))
    assert [o["kind"] for o in plan.create] == ["PodGroup", "Job"]
    assert plan.create[1]["metadata"]["name"].endswith("-a2")


def test_without_the_schedulers_crd_the_job_waits_and_creates_nothing() -> None:
    plan = reconcile(_cr(scheduler="volcano"), Observed(secret_found=True, pod_group_api=False))
    assert plan.create == []
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "PodGroupNotInstalled"
    assert "scheduling.volcano.sh/v1beta1" in plan.status["message"]


@pytest.mark.parametrize(("gang", "field"), [
    ({"scheduler": "coscheduling", "queue": "research"}, "queue is a Volcano setting"),
    ({"scheduler": "volcano", "scheduleTimeoutSeconds": 60}, "scheduleTimeoutSeconds is a coscheduling setting"),
    ({"scheduler": "kube-batch"}, "spec.gang.scheduler"),
])
def test_settings_of_the_other_scheduler_are_refused(gang: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecErrors, match=field):
        validate_resource(_cr(**gang))


def test_a_pod_template_with_another_scheduler_is_refused_at_admission() -> None:
    cr = _cr(scheduler="coscheduling")
    cr["spec"]["podTemplate"] = {"spec": {"schedulerName": "default-scheduler"}}
    with pytest.raises(SpecErrors, match=r"spec\.podTemplate\.spec\.schedulerName"):
        validate_resource(cr)
    same = copy.deepcopy(cr)
    same["spec"]["podTemplate"]["spec"]["schedulerName"] = "scheduler-plugins-scheduler"
    validate_resource(same)  # the same name is no conflict


def test_kubetune_render_prints_the_pod_group_before_the_jobs() -> None:
    """The example, as `kubetune render` shows it: ConfigMap, Service, PodGroup, then the first
    Job (the CPU-only prepare Job of a multi-node job writing to S3: it does not join the gang)."""
    objects = render_manifest(yaml.safe_load(EXAMPLE.read_text()), namespace="ml")
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "PodGroup", "Job"]
    prepare = objects[-1]["spec"]["template"]
    assert prepare["metadata"]["labels"].get("scheduling.x-k8s.io/pod-group") is None
    assert "schedulerName" not in prepare["spec"]
