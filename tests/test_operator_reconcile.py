"""The decision logic (pure) and the admission decision, without any cluster."""

from __future__ import annotations

import copy
import datetime
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.plan import Plan, status_patch
from kubetune.operator.resources import AlignmentJobStatus, TrainingJobStatus
from kubetune.operator.status import parse_trainer_status, progress_from_trainer
from kubetune.operator.training.decide import Observed, needs_reconcile, needs_trainer_status, reconcile
from kubetune.operator.validation import AdmissionRefused, admit
from kubetune.trainer.api.errors import SpecErrors
from kubetune.trainer.cli.specfiles import load_spec
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


def test_preemption_restarts_the_gang_without_using_up_backoff_limit() -> None:
    """#20 item 3: a pod preempted, evicted or drained (the Job's podFailurePolicy fails the attempt
    on `DisruptionTarget`) restarts the gang from its checkpoint and is counted apart: with
    backoffLimit 0, two preemptions and then a real failure leave the job Failed only then."""
    cr = _cr(backoffLimit=0)
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    rules = _job(first)["spec"]["podFailurePolicy"]["rules"]
    assert rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    cr = _apply(cr, first)
    disrupted = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message":
                                 "Pod ml/llama-sft-ftj-a1-0-x has condition DisruptionTarget matching FailJob rule at index 1"}]}
    jobs = [_with(_job(first), **disrupted)]
    plan = reconcile(cr, _world(first, jobs), now=T0)
    cr = _apply(cr, plan)
    assert [o["metadata"]["name"] for o in plan.create] == ["llama-sft-ftj-a2"]
    assert cr["status"]["reason"] == "Preempted" and cr["status"]["preemptions"] == 1 and cr["status"]["attempts"] == 2
    jobs.append(_with(plan.create[0], **disrupted))
    plan = reconcile(cr, _world(first, jobs), now=T0)
    cr = _apply(cr, plan)
    assert cr["status"]["preemptions"] == 2 and cr["status"]["attempts"] == 3 and cr["status"]["phase"] == "Pending"
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod 0 failed"}]}
    jobs.append(_with(plan.create[0], **failed))
    final = reconcile(cr, _world(first, jobs), now=T0)
    assert final.create == [] and final.status["reason"] == "BackoffLimitExceeded"
    assert "not counting 2 preemptions" in final.status["message"]
    TrainingJobStatus.model_validate(final.status)


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
    from kubetune.operator.common import StorageDefaults
    from kubetune.operator.training.observe import observe
    from kubetune.operator.training.render import RenderOptions

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
    from kubetune.trainer.api.spec import StorageSpec

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


@pytest.mark.slow  # > 1 s: waits out the status read's timeouts
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
    from kubetune.trainer.api.spec import StorageSpec

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
                        "updatedAt": "2025-05-01T12:00:00Z",
                        "ignored": ["tokensPerSecond: Input should be a finite number"]}
    TrainingJobStatus.model_validate({"progress": progress})


# -- status.json is written by user code: untrusted input (issue 15, item 8) ----------------------

HOSTILE_STATUS = {
    "phase": "Succeeded", "updatedAt": 1e20, "step": 10**400, "totalSteps": "lots", "loss": True,
    "epoch": -3, "etaSeconds": 1e300, "tokensPerSecond": 512.0, "state": "x" * 100_000,
    "lastCheckpoint": "-rf /", "outputUri": "s3://someone-else/bucket",
}


def test_out_of_range_status_json_never_crashes_and_the_job_still_succeeds() -> None:
    """1e20 seconds and a 400-digit step raised OverflowError in every reconcile: the job never
    reached Succeeded. Every bad field is dropped (and listed), the rest is used."""
    cr, first = _start()
    job = _with(_job(first), active=2)
    world = _world(first, [job])
    world.trainer_status = dict(HOSTILE_STATUS)
    running = reconcile(cr, world, now=T0)
    cr = _apply(cr, running)
    progress = cr["status"]["progress"]
    assert progress["tokensPerSecond"] == 512.0 and progress["state"] == "Succeeded"
    assert not {"step", "totalSteps", "loss", "epoch", "etaSeconds", "updatedAt", "lastCheckpoint"} & set(progress)
    ignored = " ".join(progress["ignored"])
    for name in ("updatedAt", "step", "totalSteps", "loss", "epoch", "etaSeconds", "lastCheckpoint", "outputUri"):
        assert name in ignored, name
    assert cr["status"]["outputUri"] == "s3://outputs/llama-sft"  # not someone else's bucket
    done = _world(first, [_with(_job(first), conditions=[{"type": "Complete", "status": "True"}])])
    done.trainer_status = dict(HOSTILE_STATUS)
    finished = reconcile(cr, done, now=T0)
    assert finished.status["phase"] == "Succeeded"
    assert len(str(finished.status)) < 5000


@pytest.mark.parametrize(("location", "accepted"), [
    ("s3://outputs/llama-sft", True), ("s3://outputs/llama-sft/1-dpo", True),
    ("s3://outputs/llama-sft-other", False), ("s3://elsewhere/x", False), ("--output=/etc", False),
    ("s3://outputs/llama-sft/" + "x" * 5000, False), (42, False),
])
def test_output_uri_from_status_json_must_be_the_jobs_own_output(location: Any, accepted: bool) -> None:
    report, notes = parse_trainer_status({"outputUri": location}, "s3://outputs/llama-sft")
    assert (report.outputUri == location) is accepted
    assert bool(notes) is not accepted


def test_status_json_that_is_not_an_object_is_ignored() -> None:
    for data in ([1, 2], "Succeeded", None, 3):
        report, _ = parse_trainer_status(data, "s3://o/x")
        assert report.phase is None and progress_from_trainer(data) == {}


# -- echoed input is bounded (item 10) --------------------------------------------------------------


def test_a_huge_invalid_value_makes_short_messages_everywhere(tmp_path: Path) -> None:
    """A 100 KB string in an enum field became a 100 KB status.message, condition message and
    event (near the 1.5 MB object limit the status patch fails)."""
    cr = _cr()
    cr["spec"]["training"]["method"] = "m" * 100_000
    cr["spec"]["training"]["lora"]["x" * 50_000] = 1
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert "spec.training.method" in plan.status["message"] and "more characters" in plan.status["message"]
    assert len(plan.status["message"]) <= 2000
    assert all(len(c["message"]) <= 2000 for c in plan.status["conditions"])
    assert plan.events and all(len(e.message) <= 2000 for e in plan.events)
    with pytest.raises(AdmissionRefused) as refused:
        admit("CREATE", None, cr)
    assert len(str(refused.value)) <= 2000 and "spec.training.method" in str(refused.value)


def test_many_problems_are_counted_not_all_listed() -> None:
    cr = _cr()
    cr["spec"]["training"]["lora"].update({f"unknown{i}": i for i in range(200)})
    with pytest.raises(AdmissionRefused) as refused:
        admit("CREATE", None, cr)
    message = str(refused.value)
    assert "200 problems" in message and re.search(r"and 1[89]\d more$", message) and len(message) <= 2000


# -- free-form objects have a bounded depth (item 11a) ----------------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        node = {"n": node}
    return node


@pytest.mark.parametrize("where", ["affinity", "env"])
def test_deeply_nested_free_form_objects_are_refused_at_admission(where: str) -> None:
    cr = _cr()
    if where == "affinity":
        cr["spec"]["affinity"] = _nested(300)
    else:
        cr["spec"]["env"] = [{"name": "X", "valueFrom": _nested(300)}]
    with pytest.raises(AdmissionRefused, match=r"nested more than 20 levels") as refused:
        admit("CREATE", None, cr)
    assert ("spec.affinity" if where == "affinity" else "spec.env[0].valueFrom") in str(refused.value)
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    assert plan.status["reason"] == "InvalidSpec" and plan.create == []
    cr["spec"]["affinity"] = EXAMPLE_FTJ["spec"]["affinity"]  # a real one is a few levels deep
    cr["spec"]["env"] = []
    admit("CREATE", None, cr)


# -- terminal resources cost nothing (item 11b) -----------------------------------------------------


def test_only_a_spec_change_brings_a_failed_job_back() -> None:
    cr, _ = _start()
    assert needs_reconcile(cr)
    for reason in ("InvalidSpec", "InsufficientGPUMemory", "BackoffLimitExceeded"):
        failed = {**cr, "status": {**cr["status"], "phase": "Failed", "reason": reason, "observedGeneration": 1}}
        assert not needs_reconcile(failed)
        changed = {**failed, "metadata": {**failed["metadata"], "generation": 2}}
        assert needs_reconcile(changed) is (reason != "BackoffLimitExceeded")
    assert not needs_reconcile({**cr, "status": {"phase": "Succeeded"}})


def test_timers_run_only_while_there_is_something_to_observe() -> None:
    """kopf keeps its finalizer on a resource while a timer runs for it: a finished job (even
    Failed/InvalidSpec, which kept one forever) and a Ready service have none."""
    from kubetune.operator.handlers import wants_job_timer as _observe_job
    from kubetune.operator.handlers import wants_service_timer as _observe_service

    for phase in ("Pending", "Running", "Suspended", None):
        assert _observe_job(status={"phase": phase})
    for status in ({"phase": "Succeeded"}, {"phase": "Failed", "reason": "InvalidSpec"},
                   {"phase": "Failed", "reason": "BackoffLimitExceeded"}):
        assert not _observe_job(status=status)
    waiting = {"type": "DependenciesReady", "status": "False", "reason": "WaitingForReference"}
    assert _observe_service(status={}) and _observe_service(status={"phase": "Pending"})
    assert _observe_service(status={"phase": "Deploying"})
    assert not _observe_service(status={"phase": "Ready", "conditions": []})
    assert _observe_service(status={"phase": "Ready", "conditions": [waiting]})
    assert not _observe_service(status={"phase": "Failed", "reason": "InvalidSpec"})
    assert not _observe_service(status={"phase": "Failed", "reason": "ProgressDeadlineExceeded"})
    assert _observe_service(status={"phase": "Failed", "reason": "NameConflict"})


def test_child_watches_match_only_our_own_children() -> None:
    import kopf

    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.handlers import register

    registry = register(kopf.OperatorRegistry(), OperatorConfig())
    watched = {handler.selector.any_name: handler.labels
               for handler in registry._watching._handlers
               if handler.selector is not None and handler.selector.any_name in ("jobs", "deployments")}
    assert set(watched) == {"jobs", "deployments"}
    for plural, owner in (("jobs", "finetunejob"), ("deployments", "inferenceservice")):
        labels = watched[plural]
        assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
        kind_filter = labels["kubetune.io/kind"]
        assert kind_filter(owner) and not kind_filter("somebody-else") and not kind_filter(None)


# -- spec.env literal secrets (item 11c) and pod-invisible data (item 13) ---------------------------


def test_literal_secret_in_env_is_a_warning() -> None:
    cr = _cr(env=[{"name": "HF_TOKEN", "value": "hf_abc"}, {"name": "NCCL_DEBUG", "value": "INFO"},
                  {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "w", "key": "k"}}}])
    (warning,) = admit("CREATE", None, cr)
    assert "spec.env[0] (HF_TOKEN)" in warning and "valueFrom" in warning and "hf_abc" not in warning


@pytest.mark.parametrize(("path", "refused"), [
    ("examples/data/demo_alpaca.json", True), ("./data", True), ("/data/train.jsonl", True),
    ("~/chat.jsonl", True), ("file:///data/x.jsonl", True), ("chat.jsonl", True),
    ("s3://data/chat.jsonl", False), ("tatsu-lab/alpaca", False), ("imdb", False),
])
def test_local_data_paths_are_refused_for_a_cluster_job(path: str, refused: bool) -> None:
    cr = _cr()
    cr["spec"]["training"]["data"]["datasets"][0]["path"] = path
    if not refused:
        admit("CREATE", None, cr)
        return
    with pytest.raises(AdmissionRefused) as err:
        admit("CREATE", None, cr)
    message = str(err.value)
    assert "spec.training.data.datasets[0].path" in message and "s3://" in message and "kubetune train" in message
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    assert plan.status["reason"] == "InvalidSpec" and plan.create == []


def test_local_data_in_pipeline_steps_and_eval_sets_is_refused_too() -> None:
    cr = _cr()
    training = cr["spec"]["training"]
    training["data"]["evalDatasets"] = [{"path": "eval.jsonl"}]
    training["pipeline"] = [{"stage": "sft"}, {"stage": "dpo", "data": {"datasets": [{"path": "prefs.jsonl",
                                                                                     "format": "preference"}]}}]
    with pytest.raises(AdmissionRefused) as err:
        admit("CREATE", None, cr)
    assert "spec.training.data.evalDatasets[0].path" in str(err.value)
    assert "spec.training.pipeline[1].data.datasets[0].path" in str(err.value)


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

    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.webhook import validate_handler

    memo = kopf.Memo(config=OperatorConfig())

    def _admit(**kwargs: Any) -> None:
        validate_handler(memo=memo, **kwargs)

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


class _RefusingKube:
    """The handlers' kube client over a dict of objects; `forbid` = {(verb, kind)} answers 403."""

    def __init__(self, cr: dict[str, Any], forbid: set[tuple[str, str]]):
        self.objects: dict[tuple[str, str], dict[str, Any]] = {(cr["kind"], cr["metadata"]["name"]): cr,
                                                               ("Secret", "s3-creds"): {"metadata": {"name": "s3-creds"}}}
        self.forbid = forbid
        self.events: list[tuple[str, str, str]] = []

    def _check(self, verb: str, kind: str) -> None:
        from kubetune.operator.kube import KubeError

        if (verb, kind) in self.forbid:
            raise KubeError(403, "forbidden", verb=verb, resource=kind.lower() + "s", namespace="ml")

    def get(self, kind: str, namespace: str, name: str, metadata_only: bool = False) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

    def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self._check("create", body["kind"])
        self.objects[(body["kind"], body["metadata"]["name"])] = copy.deepcopy(body)
        return body, True

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> None:
        self._check("patch", kind)
        target = self.objects[(kind, name)]
        for key, value in patch.items():
            target[key] = {**(target.get(key) or {}), **value} if isinstance(value, dict) else value

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def test_a_forbidden_call_on_a_training_job_is_a_condition_and_one_event() -> None:
    """Under too narrow an RBAC the Job create is refused (403): the FineTuneJob says which grant
    is missing (Synced=False/Forbidden, one Warning event), claims no Job it does not have, and
    goes on once the grant is there."""
    from kubetune.operator.apply import reconcile_resource
    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.training.component import component

    def reconcile_object(kind: str, namespace: str, name: str, kube: Any) -> None:
        reconcile_resource(kube, component(kind), namespace, name, OperatorConfig())

    cr = _cr()
    cr["metadata"].update(namespace="ml", uid="u-1")
    kube = _RefusingKube(cr, forbid={("create", "Job")})
    for _ in range(2):  # the timer's retry: still refused, reported once
        reconcile_object("FineTuneJob", "ml", "llama-sft", kube=kube)
    status = kube.objects[("FineTuneJob", "llama-sft")].get("status") or {}
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert synced["status"] == "False" and synced["reason"] == "Forbidden"
    assert "create jobs in namespace ml" in synced["message"]
    assert status.get("phase") != "Pending" and not status.get("jobName")
    assert [(t, r) for t, r, _ in kube.events] == [("Warning", "Forbidden")]
    kube.forbid.clear()
    reconcile_object("FineTuneJob", "ml", "llama-sft", kube=kube)
    status = kube.objects[("FineTuneJob", "llama-sft")]["status"]
    assert status["phase"] == "Pending" and status["jobName"] == "llama-sft-ftj-a1"
    assert next(c for c in status["conditions"] if c["type"] == "Synced")["status"] == "True"


def test_kueue_admits_a_queued_job_and_the_operator_never_fights_its_suspend() -> None:
    """#20 item 1: the resource's labels and annotations (Kueue's queue-name and priority-class,
    a mesh's annotations) reach the Job and its pods, the Job starts suspended for Kueue to admit,
    and the operator shows Queued instead of un-suspending it; a Kueue preemption (suspend again
    after running) waits for re-admission in the same attempt, nothing counted."""
    cr = _cr(backoffLimit=0)
    cr["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high",
                                "app.kubernetes.io/name": "not-ours-to-copy"}
    cr["metadata"]["annotations"] = {"sidecar.istio.io/inject": "false",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    job = _job(first)
    assert job["spec"]["suspend"] is True
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        assert meta["labels"]["app.kubernetes.io/name"] == "kubetune"  # ours win
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert "kubectl.kubernetes.io/last-applied-configuration" not in meta["annotations"]
    cr = _apply(cr, first)
    waiting = reconcile(cr, _world(first, [_with(job, active=0)]), now=T0)
    assert not waiting.patch and not waiting.create
    assert waiting.status["phase"] == "Queued" and "team-a" in waiting.status["message"]
    cr = _apply(cr, waiting)
    admitted = {**job, "spec": {**job["spec"], "suspend": False}}
    running = reconcile(cr, _world(first, [_with(admitted, active=2, ready=2)]), now=T0)
    assert running.status["phase"] == "Running" and not running.patch
    cr = _apply(cr, running)
    preempted = reconcile(cr, _world(first, [_with(job, active=0)]), now=T0)
    assert preempted.status["phase"] == "Queued" and "preempted by Kueue" in preempted.status["message"]
    assert not preempted.patch and not preempted.create and preempted.status["attempts"] == 1
    assert preempted.status["reason"] == "PreemptedByKueue"
    # Not a restart and not a failure: counted once in preemptions, attempts and failures stay.
    assert preempted.status["preemptions"] == 1 and preempted.status["failures"] == 0
    TrainingJobStatus.model_validate(preempted.status)
    cr = _apply(cr, preempted)  # the next reconciles keep saying so until Kueue re-admits it
    still = reconcile(cr, _world(first, [_with(job, active=0)]), now=T0)
    assert still.status["reason"] == "PreemptedByKueue" and "preempted by Kueue" in still.status["message"]
    assert not still.events and still.status["preemptions"] == 1
    cr = _apply(cr, still)
    resumed = reconcile(cr, _world(first, [_with(admitted, active=2, ready=2)]), now=T0)
    assert resumed.status["phase"] == "Running" and resumed.status["attempts"] == 1
    assert resumed.status["preemptions"] == 1


def _workload(job: dict[str, Any], *conditions: dict[str, str]) -> dict[str, Any]:
    """A Kueue Workload of `job` with these conditions (the shape Kueue v0.17 writes)."""
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": f"job-{job['metadata']['name']}-1a2b3", "namespace": "ml",
                         "ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"], "uid": "job-uid",
                                              "controller": True}]},
            "status": {"conditions": [{"lastTransitionTime": "2025-05-01T12:00:00Z", **c} for c in conditions]}}


NO_QUOTA = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message":
            "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor h100, "
            "16 more needed"}


def test_queued_status_says_why_in_kueues_words_and_counts_its_preemptions() -> None:
    """#20: while Kueue holds the Job the status message carries its Workload's QuotaReserved
    message; an eviction with reason Preempted (seen even before the pods ran) counts once in
    preemptions, never in attempts or failures; a PodsReadyTimeout eviction is EvictedByKueue,
    not a preemption; and a later failure with backoffLimit 0 still fails the job (a Kueue
    preemption buys no extra retry)."""
    cr = _cr(backoffLimit=0)
    cr["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    first = reconcile(cr, Observed(secret_found=True), now=T0)
    job = _job(first)
    name = job["metadata"]["name"]
    cr = _apply(cr, first)
    world = _world(first, [_with(job, active=0)])
    world.workloads = {name: _workload(job, NO_QUOTA)}
    waiting = reconcile(cr, world, now=T0)
    assert waiting.status["reason"] == "WaitingForAdmission"
    for text in (waiting.status["message"], next(c for c in waiting.status["conditions"] if c["type"] == "Running")["message"]):
        assert "queue team-a" in text and "insufficient unused quota for nvidia.com/gpu in flavor h100" in text, text
    cr = _apply(cr, waiting)

    # Admitted, then preempted before the operator saw a pod run: the Workload says so.
    evicted = {"type": "Evicted", "status": "True", "reason": "Preempted",
               "message": "Preempted to accommodate a workload (UID: u, JobUID: j) due to prioritization in the ClusterQueue"}
    world.workloads = {name: _workload(job, evicted, NO_QUOTA)}
    preempted = reconcile(cr, world, now=T0)
    assert preempted.status["reason"] == "PreemptedByKueue" and preempted.status["preemptions"] == 1
    assert "insufficient unused quota" in preempted.status["message"]
    assert preempted.status["attempts"] == 1 and preempted.status["failures"] == 0 and not preempted.create
    cr = _apply(cr, preempted)
    assert reconcile(cr, world, now=T0).status["preemptions"] == 1  # counted once

    timeout = {"type": "Evicted", "status": "True", "reason": "PodsReadyTimeout",
               "message": "Exceeded the PodsReady timeout ml/job-x"}
    world.workloads = {name: _workload(job, timeout)}
    requeued = reconcile({**cr, "status": {**cr["status"], "phase": "Running", "reason": "Training"}}, world, now=T0)
    assert requeued.status["reason"] == "EvictedByKueue" and requeued.status["phase"] == "Queued"
    assert "PodsReadyTimeout: Exceeded the PodsReady timeout" in requeued.status["message"]
    assert requeued.status["preemptions"] == 1

    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod 0 failed"}]}
    final = reconcile(cr, Observed(jobs=[_with(job, **failed)], config_map=world.config_map, service=world.service,
                                   secret_found=True), now=T0)
    assert final.status["phase"] == "Failed" and final.status["reason"] == "BackoffLimitExceeded"
    assert final.status["failures"] == 1 and "not counting 1 preemption" in final.status["message"]


def test_an_older_operators_status_gets_its_failures_counted() -> None:
    """Resources started before `status.failures`: attempts - 1 - preemptions (the gang
    restarts of that operator) becomes `failures`, so backoffLimit keeps its meaning."""
    cr, first = _start()
    job3 = {**_job(first), "metadata": {**_job(first)["metadata"], "name": "llama-sft-ftj-a3",
                                        "annotations": {"kubetune.io/attempt": "3"}}}
    status = {k: v for k, v in cr["status"].items() if k != "failures"}
    cr = {**cr, "status": {**status, "attempts": 3, "preemptions": 1, "jobName": "llama-sft-ftj-a3"}}
    plan = reconcile(cr, _world(first, [_with(job3, active=2)]), now=T0)
    assert plan.status["failures"] == 1 and plan.status["attempts"] == 3


def test_without_a_queue_an_external_suspend_is_undone() -> None:
    cr, first = _start()
    plan = reconcile(cr, _world(first, [_with({**_job(first), "spec": {**_job(first)["spec"], "suspend": True}})]), now=T0)
    assert ("Job", _job(first)["metadata"]["name"], {"spec": {"suspend": False}}) in plan.patch


class _WorkloadApi:
    """Kueue's Workload API as the operator sees it: `served` versions, or a 403."""

    def __init__(self, served: tuple[str, ...], items: list[dict[str, Any]], status: int | None = None) -> None:
        self.served, self.items, self.status, self.calls = served, items, status, []

    def list_custom(self, group_version: str, plural: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        from kubetune.operator.kube import KubeError

        self.calls.append((group_version, plural, namespace, selector))
        if self.status:
            raise KubeError(self.status, "forbidden", verb="list", resource=plural, namespace=namespace)
        if group_version.split("/")[1] not in self.served:
            raise KubeError(404, "not found")
        return self.items


def test_the_workload_is_found_by_its_owner_reference_in_the_served_kueue_api() -> None:
    """Only a queued resource's suspended, unfinished Jobs are looked up; the list is narrowed by
    Kueue's job-uid label and the owner reference decides; v1beta1 when v1beta2 is not served;
    no Kueue API or a 403: no Workload, and the reconcile goes on."""
    from kubetune.operator.training.kueue import observe_workloads

    cr = _cr()
    cr["metadata"].update(namespace="ml", labels={"kueue.x-k8s.io/queue-name": "team-a"})
    held = {"metadata": {"name": "llama-sft-ftj-a1", "namespace": "ml", "uid": "job-uid"}, "spec": {"suspend": True}}
    running = {"metadata": {"name": "llama-sft-ftj-a0", "namespace": "ml", "uid": "other"}, "spec": {"suspend": False}}
    mine = _workload(held)
    stranger = {**mine, "metadata": {**mine["metadata"], "ownerReferences": [{"uid": "x", "controller": True}]}}
    api = _WorkloadApi(("v1beta1",), [stranger, mine])
    assert observe_workloads(api, cr, [held, running]) == {"llama-sft-ftj-a1": mine}
    assert [c[0] for c in api.calls] == ["kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1"]
    assert api.calls[-1][1:] == ("workloads", "ml", "kueue.x-k8s.io/job-uid=job-uid")
    assert observe_workloads(_WorkloadApi((), [mine]), cr, [held]) == {}
    assert observe_workloads(_WorkloadApi(("v1beta2",), [mine], status=403), cr, [held]) == {}
    unqueued = _WorkloadApi(("v1beta2",), [mine])
    assert observe_workloads(unqueued, _cr(), [held]) == {} and unqueued.calls == []
