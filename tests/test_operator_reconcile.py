"""The decision logic (pure) and the admission decision, without any cluster."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.reconcile import Observed, Plan, needs_trainer_status, reconcile, status_patch
from kubetune.operator.resources import AlignmentJobStatus, TrainingJobStatus
from kubetune.operator.status import progress_from_trainer
from kubetune.operator.validation import AdmissionRefused, admit
from kubetune.trainer.errors import SpecErrors
from kubetune.trainer.specfile import load_spec
from tests.test_operator_crds import EXAMPLE_FTJ

T0 = datetime.datetime(2025, 5, 1, 12, 0, tzinfo=datetime.UTC)


def _cr(**spec: Any) -> dict[str, Any]:
    """The example job without the prepare step (a multi-node S3 job gets one by default; the
    tests of the prepare step turn it back on), so the gang's own flow is what is tested."""
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"].update(uid="uid-1", generation=1)
    cr["spec"]["training"]["data"]["cache"] = "off"
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


class _SecretsOnly:
    """A Kube stand-in for `observe`: no children, only the Secrets named exist; records reads."""

    def __init__(self, *secrets: str) -> None:
        self.secrets = set(secrets)
        self.reads: list[tuple[str, str, bool]] = []

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return []

    def get(self, kind: str, namespace: str, name: str, metadata_only: bool = False) -> dict[str, Any] | None:
        self.reads.append((kind, name, metadata_only))
        if kind == "Secret" and name in self.secrets:
            return {"metadata": {"name": name, "namespace": namespace}}
        return None


def test_missing_default_secret_waits_like_its_own() -> None:
    """A job without spec.storage.secretRef gets the operator's default Secret
    (--default-s3-secret) in its pods: it is checked like the job's own, so a missing one keeps
    the job Pending (SecretNotFound, saying which Secret) instead of leaving its pods in
    CreateContainerConfigError."""
    from kubetune.operator.handlers import observe
    from kubetune.operator.render.common import StorageDefaults
    from kubetune.operator.render.training import RenderOptions

    options = RenderOptions(storage_defaults=StorageDefaults(secret="team-s3"))
    cr = _cr(storage={"endpoint": "http://minio.minio:9000"})

    kube = _SecretsOnly()
    observed = observe(kube, cr, options)  # type: ignore[arg-type]
    assert ("Secret", "team-s3", True) in kube.reads and observed.secret_found is False
    plan = reconcile(cr, observed, now=T0, options=options)
    assert plan.create == [] and plan.status["phase"] == "Pending" and plan.status["reason"] == "SecretNotFound"
    assert "'team-s3'" in plan.status["message"] and "default S3 Secret" in plan.status["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "SecretNotFound")]
    ready = {c["type"]: c for c in plan.status["conditions"]}["DependenciesReady"]
    assert ready["status"] == "False" and ready["reason"] == "SecretNotFound"

    # Created: the job starts, and its pods reference that Secret.
    observed = observe(_SecretsOnly("team-s3"), cr, options)  # type: ignore[arg-type]
    assert observed.secret_found is True
    plan = reconcile(_apply(cr, plan), observed, now=T0, options=options)
    env = {e["name"]: e for e in _job(plan)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    assert plan.status["reason"] == "JobCreated"

    # The job's own Secret wins: the default is never read, and its own missing one is named.
    kube = _SecretsOnly("team-s3")
    own = _cr()
    observed = observe(kube, own, options)  # type: ignore[arg-type]
    assert [r for r in kube.reads if r[0] == "Secret"] == [("Secret", "s3-creds", True)]
    plan = reconcile(own, observed, now=T0, options=options)
    assert plan.status["reason"] == "SecretNotFound" and "'s3-creds' (spec.storage.secretRef)" in plan.status["message"]

    # A job that names its own serviceAccountName uses pod identity: no default Secret to wait for.
    kube = _SecretsOnly()
    identity = _cr(storage={}, serviceAccountName="trainer-irsa")
    observed = observe(kube, identity, options)  # type: ignore[arg-type]
    assert not [r for r in kube.reads if r[0] == "Secret"] and observed.secret_found is None
    assert _job(reconcile(identity, observed, now=T0, options=options))


def test_status_read_gives_up_at_once_on_a_failing_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator reads status.json inside a reconcile, holding the resource's lock (Job events
    for it wait). With credentials at hand and an endpoint that keeps failing, the read must not
    sleep through the storage layer's retries (8 adaptive attempts: seconds to minutes): one try,
    and the next observation reads again."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubetune.operator.status import read_trainer_status
    from kubetune.trainer.spec import StorageSpec

    requests: list[str] = []

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = b'<?xml version="1.0"?><Error><Code>InternalError</Code><Message>down</Message></Error>'
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAOPERATORSTATUS01", "AWS_SECRET_ACCESS_KEY": "operator-status-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = StorageSpec(endpointUrl=f"http://127.0.0.1:{server.server_address[1]}", pathStyle=True)
        assert settings.maxAttempts > 2  # the storage layer's default: many retries
        assert read_trainer_status("s3://outputs/llama-sft", settings) is None
    finally:
        server.shutdown()
        server.server_close()
    # botocore counts retries after the first request: StorageSpec's minimum (1) is one retry.
    assert 1 <= len(requests) <= 2, requests


def test_status_read_gives_up_quickly_on_an_endpoint_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that accepts connections and never answers (a hung proxy, a black-holed load
    balancer) must not hold the reconcile for the storage layer's socket timeouts (60 s per
    read): the status read uses short ones (`STATUS_READ_CONNECT_TIMEOUT_S`/`STATUS_READ_TIMEOUT_S`)
    and returns None within seconds."""
    import socket
    import threading
    import time

    from kubetune.operator import status as status_module
    from kubetune.operator.status import read_trainer_status
    from kubetune.trainer.spec import StorageSpec

    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAOPERATORSTATUS02", "AWS_SECRET_ACCESS_KEY": "operator-status-secret2",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        settings = StorageSpec(endpointUrl=f"http://127.0.0.1:{listener.getsockname()[1]}", pathStyle=True)
        started = time.monotonic()
        assert read_trainer_status("s3://outputs/llama-sft", settings) is None
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert accepted, "the read never reached the silent endpoint"
    assert status_module.STATUS_READ_TIMEOUT_S <= elapsed < 15, elapsed


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


# -- the prepare step: tokenize once before the gang ----------------------------------------------

CACHE = "s3://cache/kubetune/"


def _prepared_cr(**spec: Any) -> dict[str, Any]:
    cr = _cr(**spec)
    cr["spec"]["training"]["data"]["cache"] = CACHE
    return cr


def test_prepare_job_runs_before_the_gang_and_its_success_starts_it() -> None:
    cr = _prepared_cr()
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    cr = _apply(cr, first)
    assert [(o["kind"], o["metadata"]["name"]) for o in first.create] == [
        ("ConfigMap", "llama-sft-ftj-config"), ("Service", "llama-sft-ftj"), ("Job", "llama-sft-ftj-prepare")]
    status = cr["status"]
    assert status["phase"] == "Pending" and status["reason"] == "Preparing" and not status.get("attempts")
    assert CACHE in status["message"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["DataPrepared"]["status"] == "False" and conds["DataPrepared"]["reason"] == "Preparing"
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Preparing")]
    assert needs_trainer_status(cr) is None  # no trainer yet: no status.json to read
    prepare = _job(first)

    # Running, again, and after an operator restart that lost the status: nothing new.
    for world_cr in (cr, {k: v for k, v in cr.items() if k != "status"}):
        again = reconcile(world_cr, _world(first, [_with(prepare, active=1)]), now=T0)
        assert again.create == [] and again.status["reason"] == "Preparing" and not again.status.get("attempts")
    assert reconcile(cr, _world(first, [_with(prepare, active=1)]), now=T0).events == []

    # Done: DataPrepared, an event, and only now the training Job (attempt 1).
    done = _with(prepare, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    plan = reconcile(cr, _world(first, [done]), now=T0)
    cr = _apply(cr, plan)
    assert [o["metadata"]["name"] for o in plan.create] == ["llama-sft-ftj-a1"]
    assert [e.reason for e in plan.events] == ["Prepared", "JobCreated"]
    assert cr["status"]["attempts"] == 1 and cr["status"]["jobName"] == "llama-sft-ftj-a1"
    assert {c["type"]: c["status"] for c in cr["status"]["conditions"]}["DataPrepared"] == "True"
    assert needs_trainer_status(cr) == "s3://outputs/llama-sft"

    # A gang restart never reruns the prepare step.
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    restart = reconcile(cr, _world(first, [done, _with(plan.create[0], **failed)]), now=T0)
    assert [o["metadata"]["name"] for o in restart.create] == ["llama-sft-ftj-a2"]


@pytest.mark.parametrize(("reason", "expected"), [("PodFailurePolicy", "exit code 2"), ("BackoffLimitExceeded", "failed")])
def test_failed_prepare_job_fails_the_resource(reason: str, expected: str) -> None:
    cr = _prepared_cr()
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    cr = _apply(cr, first)
    failed = _with(_job(first), conditions=[{"type": "Failed", "status": "True", "reason": reason, "message": "boom"}])
    plan = reconcile(cr, _world(first, [failed]), now=T0)
    cr = _apply(cr, plan)
    assert plan.create == []
    assert cr["status"]["phase"] == "Failed" and cr["status"]["reason"] == "PrepareFailed"
    assert expected in cr["status"]["message"] and "llama-sft-ftj-prepare" in cr["status"]["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "PrepareFailed")]
    assert reconcile(cr, _world(first, [failed]), now=T0).create == []  # terminal


def test_no_prepare_step_without_a_shared_cache_or_with_streaming() -> None:
    local = _cr()
    local["spec"]["training"]["data"]["cache"] = "/data/cache"  # a pod's own disk: not shared
    streamed = _prepared_cr()
    streamed["spec"]["training"]["data"].update(streaming=True)
    streamed["spec"]["training"]["train"]["maxSteps"] = 10
    for cr in (local, streamed):
        plan = reconcile(cr, Observed(secret_found=True), now=T0)
        assert [o["metadata"]["name"] for o in plan.create][-1] == "llama-sft-ftj-a1", plan.status


def test_multi_node_s3_jobs_tokenize_once_by_default() -> None:
    """No data.cache: a multi-node job writing to S3 gets the prepare step with the `auto` cache
    (beside its output), and its pods read that cache; one node, or `off`, tokenize in the pod."""
    default = _cr()
    del default["spec"]["training"]["data"]["cache"]
    plan = reconcile(default, Observed(secret_found=True), now=T0)
    assert [o["metadata"]["name"] for o in plan.create][-1] == "llama-sft-ftj-prepare"
    assert "s3://outputs/kubetune-cache/" in plan.status["message"]
    config = next(o for o in plan.create if o["kind"] == "ConfigMap")
    assert yaml.safe_load(config["data"]["job.yaml"])["spec"]["training"]["data"]["cache"] == "auto"
    single = copy.deepcopy(default)
    single["spec"]["nodes"] = 1
    for cr in (single, _cr()):  # _cr() says data.cache: off
        plan = reconcile(cr, Observed(secret_found=True), now=T0)
        assert [o["metadata"]["name"] for o in plan.create][-1] == "llama-sft-ftj-a1", plan.status
        config = next(o for o in plan.create if o["kind"] == "ConfigMap")
        assert yaml.safe_load(config["data"]["job.yaml"])["spec"]["training"]["data"].get("cache") in (None, "off")


def test_suspend_while_preparing_and_a_deleted_prepare_job_is_recreated() -> None:
    cr = _prepared_cr()
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    cr = _apply(cr, first)
    cr["spec"]["suspend"] = True
    plan = reconcile(cr, _world(first, [_with(_job(first), active=1)]), now=T0)
    assert plan.patch == [("Job", "llama-sft-ftj-prepare", {"spec": {"suspend": True}})]
    assert plan.status["phase"] == "Suspended"
    cr = _apply(cr, plan)
    cr["spec"]["suspend"] = False
    suspended = {**_job(first), "spec": {**_job(first)["spec"], "suspend": True}}
    plan = reconcile(cr, _world(first, [suspended]), now=T0)
    assert plan.patch == [("Job", "llama-sft-ftj-prepare", {"spec": {"suspend": False}})]
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "Preparing"
    gone = reconcile(_apply(cr, plan), _world(first, []), now=T0)
    assert [o["metadata"]["name"] for o in gone.create] == ["llama-sft-ftj-prepare"]
