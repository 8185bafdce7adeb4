"""The decision logic (pure) and the admission decision, without any cluster."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.reconcile import Observed, Plan, reconcile, status_patch
from kubetune.operator.resources import AlignmentJobStatus, TrainingJobStatus
from kubetune.operator.status import progress_from_trainer
from kubetune.operator.validation import AdmissionRefused, admit
from kubetune.trainer.errors import SpecErrors
from kubetune.trainer.specfile import load_spec
from tests.test_operator_crds import EXAMPLE_FTJ

T0 = datetime.datetime(2025, 5, 1, 12, 0, tzinfo=datetime.UTC)


def _cr(**spec: Any) -> dict[str, Any]:
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"].update(uid="uid-1", generation=1)
    cr["spec"].update(spec)
    return cr


def _apply(cr: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The resource after the plan's status was written (and validated like the CRD would)."""
    model = AlignmentJobStatus if cr["kind"] == "AlignmentJob" else TrainingJobStatus
    model.model_validate(plan.status)
    return {**cr, "status": plan.status}


def _job(plan: Plan) -> dict[str, Any]:
    (job,) = [o for o in plan.create if o["kind"] == "Job"]
    return job


def _with(job: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {**job, "status": status}


def _world(plan: Plan, jobs: list[dict[str, Any]] | None = None) -> Observed:
    kinds = {o["kind"]: o for o in plan.create}
    return Observed(jobs=jobs or [], config_map=kinds.get("ConfigMap"), service=kinds.get("Service"), secret_found=True)


def _start() -> tuple[dict[str, Any], Plan]:
    cr = _cr()
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    return _apply(cr, plan), plan


def test_fresh_job_creates_children_and_goes_pending() -> None:
    cr, plan = _start()
    assert [o["kind"] for o in plan.create] == ["ConfigMap", "Service", "Job"]
    status = cr["status"]
    assert status["phase"] == "Pending" and status["reason"] == "JobCreated"
    assert status["attempts"] == 1 and status["jobName"] == "llama-sft-ftj-a1"
    assert status["observedGeneration"] == 1 and status["trainingHash"]
    assert status["startTime"] == "2025-05-01T12:00:00Z"
    assert status["outputUri"] == "s3://outputs/llama-sft"
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "JobCreated")]


def test_reconcile_is_idempotent() -> None:
    cr, first = _start()
    again = reconcile(cr, _world(first, [_job(first)]), now=T0 + datetime.timedelta(seconds=5))
    assert again.create == [] and again.patch == [] and again.events == []
    assert status_patch(cr["status"], again.status) is None


def test_adopts_children_after_a_crash_before_the_status_was_written() -> None:
    cr, first = _start()
    lost = {k: v for k, v in cr.items() if k != "status"}
    plan = reconcile(lost, _world(first, [_job(first)]), now=T0)
    assert plan.create == []
    assert plan.status["attempts"] == 1 and plan.status["trainingHash"] == cr["status"]["trainingHash"]


def test_running_succeeded_and_terminal() -> None:
    cr, first = _start()
    job = _job(first)
    running = reconcile(cr, _world(first, [_with(job, active=2, ready=2)]), now=T0)
    cr = _apply(cr, running)
    assert cr["status"]["phase"] == "Running"
    assert [e.reason for e in running.events] == ["Training"]
    done = reconcile(cr, _world(first, [_with(job, succeeded=2, conditions=[{"type": "Complete", "status": "True"}])]), now=T0)
    cr = _apply(cr, done)
    assert cr["status"]["phase"] == "Succeeded" and cr["status"]["completionTime"]
    conds = {c["type"]: c for c in cr["status"]["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["Running"]["status"] == "False"
    assert reconcile(cr, _world(first, []), now=T0).create == []  # terminal: never restarted


def test_failure_restarts_the_gang_until_backoff_limit() -> None:
    cr = _cr(backoffLimit=1)
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    cr = _apply(cr, first)
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod 1 failed"}]}
    plan = reconcile(cr, _world(first, [_with(_job(first), **failed)]), now=T0)
    cr = _apply(cr, plan)
    assert [o["metadata"]["name"] for o in plan.create] == ["llama-sft-ftj-a2"]
    assert cr["status"]["attempts"] == 2 and cr["status"]["phase"] == "Pending" and cr["status"]["reason"] == "Restarting"
    assert plan.events[0].type == "Warning"
    jobs = [_with(_job(first), **failed), _with(plan.create[0], **failed)]
    final = reconcile(cr, _world(first, jobs), now=T0)
    assert final.create == [] and final.status["phase"] == "Failed"
    assert final.status["reason"] == "BackoffLimitExceeded"


def test_exit_code_2_fails_without_retry() -> None:
    cr, first = _start()
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}]}
    plan = reconcile(cr, _world(first, [_with(_job(first), **failed)]), now=T0)
    assert plan.create == [] and plan.status["phase"] == "Failed" and plan.status["reason"] == "ConfigError"


def test_deadline_spans_attempts() -> None:
    cr, first = _start()
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    later = T0 + datetime.timedelta(hours=10)
    plan = reconcile(cr, _world(first, [_with(_job(first), **failed)]), now=later)
    assert [o["spec"]["activeDeadlineSeconds"] for o in plan.create] == [86400 - 36000]
    too_late = reconcile(cr, _world(first, [_with(_job(first), **failed)]), now=T0 + datetime.timedelta(days=2))
    assert too_late.create == [] and too_late.status["reason"] == "DeadlineExceeded"


def test_suspend_and_resume_patch_the_job() -> None:
    cr, first = _start()
    cr["spec"]["suspend"] = True
    plan = reconcile(cr, _world(first, [_with(_job(first), active=2)]), now=T0)
    assert plan.patch == [("Job", "llama-sft-ftj-a1", {"spec": {"suspend": True}})]
    cr = _apply(cr, plan)
    assert cr["status"]["phase"] == "Suspended"
    cr["spec"]["suspend"] = False
    suspended_job = copy.deepcopy(_job(first))
    suspended_job["spec"]["suspend"] = True
    plan = reconcile(cr, _world(first, [suspended_job]), now=T0)
    assert plan.patch == [("Job", "llama-sft-ftj-a1", {"spec": {"suspend": False}})]
    assert plan.status["reason"] == "Resumed"


def test_training_change_after_start_is_refused_once() -> None:
    cr, first = _start()
    cr["spec"]["training"]["train"]["epochs"] = 9
    cr["metadata"]["generation"] = 2
    plan = reconcile(cr, _world(first, [_job(first)]), now=T0)
    cr = _apply(cr, plan)
    cond = {c["type"]: c for c in cr["status"]["conditions"]}["SpecValid"]
    assert cond["status"] == "False" and cond["reason"] == "TrainingSpecImmutable"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "TrainingSpecImmutable")]
    again = reconcile(cr, _world(first, [_job(first)]), now=T0)
    assert again.events == [] and again.create == []


def test_invalid_spec_fails_with_field_named_condition() -> None:
    cr = _cr(nodes=0)
    cr["spec"]["training"]["method"] = "magic"
    plan = reconcile(cr, Observed(), now=T0)
    assert plan.create == [] and plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert "spec.nodes" in plan.status["message"] and "spec.training.method: 'magic' is not a valid choice" in plan.status["message"]
    assert plan.events[0].type == "Warning"


def test_missing_secret_waits() -> None:
    plan = reconcile(_cr(), Observed(secret_found=False), now=T0)
    assert plan.create == [] and plan.status["phase"] == "Pending" and plan.status["reason"] == "SecretNotFound"
    assert "s3-creds" in plan.status["message"]


def _alignment(**refs: Any) -> dict[str, Any]:
    cr = _cr(**refs)
    cr["kind"] = "AlignmentJob"
    cr["metadata"]["name"] = "dpo"
    cr["spec"]["training"]["stage"] = "dpo"
    del cr["spec"]["training"]["model"]["path"]
    return cr


@pytest.mark.parametrize(
    ("target", "phase", "reason"),
    [
        (None, "Pending", "ReferenceNotFound"),
        ({"status": {"phase": "Running", "progress": {"percent": 40.0}}}, "Pending", "WaitingForReference"),
        ({"status": {"phase": "Failed", "reason": "BackoffLimitExceeded", "message": "boom"}}, "Failed", "ReferenceFailed"),
    ],
)
def test_alignment_job_reference_states(target: dict[str, Any] | None, phase: str, reason: str) -> None:
    cr = _alignment(baseModelFrom={"fineTuneJob": "llama-sft"})
    plan = reconcile(cr, Observed(secret_found=True, references={"baseModelFrom": target}), now=T0)
    assert plan.create == []
    assert (plan.status["phase"], plan.status["reason"]) == (phase, reason)
    AlignmentJobStatus.model_validate(plan.status)


def test_alignment_job_starts_from_the_reference_output() -> None:
    cr = _alignment(baseModelFrom={"fineTuneJob": "llama-sft"})
    target = {"spec": {"training": {"output": {"path": "s3://outputs/llama-sft"}}}, "status": {"phase": "Succeeded"}}
    plan = reconcile(cr, Observed(secret_found=True, references={"baseModelFrom": target}), now=T0)
    assert plan.status["baseModelUri"] == "s3://outputs/llama-sft"
    config = next(o for o in plan.create if o["kind"] == "ConfigMap")
    assert yaml.safe_load(config["data"]["job.yaml"])["spec"]["training"]["model"]["path"] == "s3://outputs/llama-sft"


def test_progress_from_trainer_status() -> None:
    progress = progress_from_trainer({"phase": "Running", "step": 25, "totalSteps": 200, "loss": 0.5, "epoch": None,
                                      "tokensPerSecond": float("nan"), "updatedAt": 1746100800.0, "extra": 1})
    assert progress == {"step": 25, "totalSteps": 200, "percent": 12.5, "loss": 0.5, "state": "Running",
                        "updatedAt": "2025-05-01T12:00:00Z"}
    TrainingJobStatus.model_validate({"progress": progress})


def test_status_patch_removes_and_merges() -> None:
    assert status_patch({"a": 1, "b": {"x": 1, "y": 2}}, {"b": {"x": 1}, "c": 3}) == {"b": {"y": None}, "c": 3, "a": None}
    assert status_patch({"a": 1}, {"a": 1}) is None


def test_admission_refuses_with_the_validate_message(tmp_path: Path) -> None:
    bad = copy.deepcopy(EXAMPLE_FTJ)
    bad["spec"]["training"]["method"] = "magic"
    bad["spec"]["training"]["lora"]["rnak"] = 4
    with pytest.raises(AdmissionRefused) as refused:
        admit("CREATE", None, bad)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecErrors) as validated:
        load_spec(path)  # what `kubetune validate job.yaml` reports
    problems = [str(e) for e in validated.value.errors]
    assert problems and all(p in str(refused.value) for p in problems)
    assert "did you mean `rank`?" in str(refused.value)


def test_admission_immutability_and_warnings() -> None:
    started = copy.deepcopy(EXAMPLE_FTJ)
    started["status"] = {"trainingHash": "x", "attempts": 1}
    assert admit("UPDATE", started, {**started, "metadata": {**started["metadata"], "labels": {"a": "b"}}}) == []
    suspended = copy.deepcopy(started)
    suspended["spec"]["suspend"] = True
    assert admit("UPDATE", started, suspended) == []
    changed = copy.deepcopy(started)
    changed["spec"]["training"]["train"]["epochs"] = 5
    with pytest.raises(AdmissionRefused, match=r"spec\.training cannot change after the job has started"):
        admit("UPDATE", started, changed)
    local = copy.deepcopy(EXAMPLE_FTJ)
    local["spec"]["training"]["output"]["path"] = "outputs/x"
    (warning,) = admit("CREATE", None, local)
    assert "not an s3:// location" in warning


def test_handler_turns_refusals_into_admission_errors() -> None:
    import kopf

    import tests.operator_support  # noqa: F401  (operator settings for tests, before importing handlers)
    from kubetune.operator.handlers import _admit

    bad = copy.deepcopy(EXAMPLE_FTJ)
    bad["spec"]["nodes"] = 0
    with pytest.raises(kopf.AdmissionError) as err:
        _admit(body=bad, old=None, operation="CREATE", warnings=[])
    assert "spec.nodes" in str(err.value) and err.value.code == 422
    warnings: list[str] = []
    _admit(body=EXAMPLE_FTJ, old=None, operation="CREATE", warnings=warnings)
    assert warnings == []
