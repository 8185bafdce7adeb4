"""The real operator process (kopf's KopfRunner) against kmock's Kubernetes emulator over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest
import pytest_asyncio

from tests.operator_support import (
    NAMESPACE,
    Api,
    Cluster,
    eventually,
    finetunejob,
    register_resources,
    running_operator,
    write_kubeconfig,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    return {"cls": Cluster}


@pytest_asyncio.fixture()
async def api(kmock: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    register_resources(kmock)
    config = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    async with aiohttp.ClientSession() as session:
        yield Api(str(kmock.url), session)


def _owned_by(obj: dict[str, Any], cr: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == cr["metadata"]["uid"] and r["kind"] == cr["kind"] and r["controller"] for r in refs)


async def _children(api: Api, cr: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for kind in ("ConfigMap", "Service", "Job"):
        out[kind] = sorted(o["metadata"]["name"] for o in await api.list(kind) if _owned_by(o, cr))
    return out


async def _phase(api: Api, kind: str, name: str, phase: str) -> dict[str, Any] | None:
    obj = await api.get(kind, name)
    return obj if obj and (obj.get("status") or {}).get("phase") == phase else None


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in obj["status"].get("conditions") or []:
        if cond["type"] == type_:
            return cond
    raise AssertionError(f"no {type_} condition in {obj['status']}")


async def test_finetunejob_lifecycle_to_succeeded(api: Api) -> None:
    async with running_operator():
        cr = await api.create(finetunejob())
        await eventually(lambda: _phase(api, "FineTuneJob", "llama-sft", "Pending"), what="Pending")
        children = await eventually(
            lambda: _wait_children(api, cr, {"ConfigMap": 1, "Service": 1, "Job": 1}), what="children"
        )
        assert children == {
            "ConfigMap": ["llama-sft-ftj-config"],
            "Service": ["llama-sft-ftj"],
            "Job": ["llama-sft-ftj-a1"],
        }
        job = await api.get("Job", "llama-sft-ftj-a1")
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        assert job["spec"]["completionMode"] == "Indexed"

        await api.job_status("llama-sft-ftj-a1", {"active": 2, "ready": 2})
        running = await eventually(lambda: _phase(api, "FineTuneJob", "llama-sft", "Running"), what="Running")
        assert _condition(running, "Running")["status"] == "True"
        assert running["status"]["attempts"] == 1
        assert running["status"]["observedGeneration"] == 1

        await api.job_status(
            "llama-sft-ftj-a1",
            {"active": 0, "succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]},
        )
        done = await eventually(lambda: _phase(api, "FineTuneJob", "llama-sft", "Succeeded"), what="Succeeded")
        assert _condition(done, "Succeeded")["status"] == "True"
        assert _condition(done, "Running")["status"] == "False"
        assert done["status"]["completionTime"]
        assert done["status"]["outputUri"] == "s3://outputs/llama-sft"
        reasons = [e["reason"] for e in await api.events("llama-sft")]
        assert {"JobCreated", "Training", "Completed"} <= set(reasons), reasons
        # Still exactly one set of children.
        assert await _children(api, cr) == children


async def _wait_children(api: Api, cr: dict[str, Any], counts: dict[str, int]) -> dict[str, list[str]] | None:
    children = await _children(api, cr)
    return children if {k: len(v) for k, v in children.items()} == counts else None


async def test_gang_restart_then_backoff_limit(api: Api) -> None:
    async with running_operator():
        cr = await api.create(finetunejob("gang", backoffLimit=1))
        await eventually(lambda: api.get("Job", "gang-ftj-a1"), what="Job a1")
        await api.job_status("gang-ftj-a1", {"active": 2})
        await eventually(lambda: _phase(api, "FineTuneJob", "gang", "Running"))
        # One pod died: the Job (backoffLimit 0) fails; the operator restarts the whole gang.
        await api.job_status(
            "gang-ftj-a1",
            {"active": 0, "failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]},
        )
        await eventually(lambda: api.get("Job", "gang-ftj-a2"), what="Job a2")
        restarted = await api.get("FineTuneJob", "gang")
        assert restarted["status"]["attempts"] == 2
        assert restarted["status"]["jobName"] == "gang-ftj-a2"
        job2 = await api.get("Job", "gang-ftj-a2")
        env = {e["name"]: e.get("value") for e in job2["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KUBETUNE_ATTEMPT"] == "2"
        assert env["KUBETUNE_MASTER_ADDR"] == f"gang-ftj-a2-0.gang-ftj.{NAMESPACE}.svc"
        # The second attempt fails too: backoffLimit 1 is used up.
        await api.job_status(
            "gang-ftj-a2",
            {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod failed"}]},
        )
        failed = await eventually(lambda: _phase(api, "FineTuneJob", "gang", "Failed"), what="Failed")
        assert failed["status"]["reason"] == "BackoffLimitExceeded"
        assert _condition(failed, "Failed")["status"] == "True"
        assert (await _children(api, cr))["Job"] == ["gang-ftj-a1", "gang-ftj-a2"]
        reasons = [e["reason"] for e in await api.events("gang")]
        assert "Restarting" in reasons and "BackoffLimitExceeded" in reasons


async def test_config_error_fails_fast(api: Api) -> None:
    async with running_operator():
        await api.create(finetunejob("cfg"))
        await eventually(lambda: api.get("Job", "cfg-ftj-a1"))
        await api.job_status(
            "cfg-ftj-a1",
            {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                             "message": "Container trainer for pod ml/cfg-ftj-a1-0-x failed with exit code 2 matching FailJob rule at index 0"}]},
        )
        failed = await eventually(lambda: _phase(api, "FineTuneJob", "cfg", "Failed"))
        assert failed["status"]["reason"] == "ConfigError"
        assert "exit code 2" in failed["status"]["message"]
        assert await api.get("Job", "cfg-ftj-a2") is None


async def test_training_job_only_after_the_prepare_job_succeeds(api: Api) -> None:
    """With an s3:// data.cache the datasets are tokenized once in a CPU-only Job first."""
    body = finetunejob("prep")
    body["spec"]["training"]["data"]["cache"] = "s3://cache/kubetune/"
    async with running_operator():
        cr = await api.create(body)
        prepare = await eventually(lambda: api.get("Job", "prep-ftj-prepare"), what="prepare Job")
        assert prepare["spec"]["template"]["spec"]["containers"][0]["args"] == ["prepare", "/etc/kubetune/job.yaml"]
        await api.job_status("prep-ftj-prepare", {"active": 1})
        # A reconcile that saw the prepare pod running (its message says so) created no gang.
        pending = await eventually(lambda: _preparing_observed(api, "prep"), what="a reconcile of the running prepare Job")
        assert pending["status"]["phase"] == "Pending" and pending["status"]["reason"] == "Preparing"
        assert _condition(pending, "DataPrepared")["status"] == "False"
        assert (await _children(api, cr))["Job"] == ["prep-ftj-prepare"]

        await api.job_status("prep-ftj-prepare", {"active": 0, "succeeded": 1,
                                                  "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: api.get("Job", "prep-ftj-a1"), what="training Job after prepare")
        started = await api.get("FineTuneJob", "prep")
        assert _condition(started, "DataPrepared")["status"] == "True"
        assert started["status"]["attempts"] == 1
        reasons = [e["reason"] for e in await api.events("prep")]
        assert reasons.index("Preparing") < reasons.index("Prepared") < reasons.index("JobCreated"), reasons
        assert (await _children(api, cr))["Job"] == ["prep-ftj-a1", "prep-ftj-prepare"]


async def _preparing_observed(api: Api, name: str) -> dict[str, Any] | None:
    obj = await api.get("FineTuneJob", name)
    return obj if obj and (obj.get("status") or {}).get("message", "").startswith("tokenizing the datasets in Job") else None


async def test_invalid_spec_condition_and_event_no_children(api: Api) -> None:
    async with running_operator():
        bad = finetunejob("bad", nodes=0)
        bad["spec"]["training"]["method"] = "magic"
        cr = await api.create(bad)
        failed = await eventually(lambda: _phase(api, "FineTuneJob", "bad", "Failed"))
        assert failed["status"]["reason"] == "InvalidSpec"
        message = _condition(failed, "SpecValid")["message"]
        assert "spec.nodes" in message and "spec.training.method" in message and "'magic'" in message
        events = await api.events("bad")
        assert [e["type"] for e in events if e["reason"] == "InvalidSpec"] == ["Warning"]
        # Fixing the spec lets it start.
        await api.patch("FineTuneJob", "bad", {"spec": {"nodes": 1, "training": {"method": "lora"}}})
        await eventually(lambda: _phase(api, "FineTuneJob", "bad", "Pending"), what="recovered")
        await eventually(lambda: api.get("Job", "bad-ftj-a1"))
        assert (await _children(api, cr))["Job"] == ["bad-ftj-a1"]


KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


async def _finalizers(api: Api, kind: str, name: str) -> list[str]:
    return ((await api.get(kind, name)) or {}).get("metadata", {}).get("finalizers") or []


async def test_finished_jobs_keep_no_timer_and_no_finalizer(api: Api) -> None:
    """A Failed/InvalidSpec job kept its reconcile timer (and so kopf's finalizer) forever: it
    cost a reconcile every interval, and with the operator uninstalled it could not be deleted.
    A running job has both; once it has finished, neither."""
    async with running_operator():
        bad = finetunejob("broken")
        bad["spec"]["training"]["method"] = "magic"
        await api.create(bad)
        await api.create(finetunejob("done"))
        await eventually(lambda: api.get("Job", "done-ftj-a1"))
        await eventually(lambda: _has(api, "done", KOPF_FINALIZER), what="a timer (and its finalizer) while in flight")
        await eventually(lambda: _phase(api, "FineTuneJob", "broken", "Failed"))
        await api.job_status("done-ftj-a1", {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: _phase(api, "FineTuneJob", "done", "Succeeded"))
        for name in ("broken", "done"):
            await eventually(lambda name=name: _lacks(api, name, KOPF_FINALIZER), what=f"{name}: finalizer removed")
        # Fixing the spec still brings the failed job back (the update handler, not a timer).
        await api.patch("FineTuneJob", "broken", {"spec": {"training": {"method": "lora"}}})
        await eventually(lambda: api.get("Job", "broken-ftj-a1"), what="recovered")
    # With the operator gone, a finished job is deleted at once (nothing waits for a finalizer).
    await api.delete("FineTuneJob", "done")
    assert await api.get("FineTuneJob", "done") is None


async def _has(api: Api, name: str, finalizer: str) -> bool:
    return finalizer in await _finalizers(api, "FineTuneJob", name)


async def _lacks(api: Api, name: str, finalizer: str) -> bool:
    return finalizer not in await _finalizers(api, "FineTuneJob", name)


async def test_missing_secret_waits_with_condition(api: Api) -> None:
    async with running_operator():
        await api.create(finetunejob("sec", storage={"secretRef": {"name": "s3-creds"}}))
        pending = await eventually(lambda: _phase(api, "FineTuneJob", "sec", "Pending"))
        await eventually(lambda: _reason(api, "sec", "SecretNotFound"))
        assert await api.get("Job", "sec-ftj-a1") is None
        refs = await _secret_refs_once_created(api, "s3-creds", "sec-ftj-a1")
        assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
        assert pending


async def test_missing_default_secret_waits_with_condition(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubetune operator --default-s3-secret team-s3` (Helm `jobs.s3.existingSecret`): a job that
    names no Secret waits for that one, as for its own, instead of starting pods that cannot."""
    monkeypatch.setenv("KUBETUNE_DEFAULT_S3_SECRET", "team-s3")
    async with running_operator():
        await api.create(finetunejob("dsec"))
        pending = await eventually(lambda: _reason(api, "dsec", "SecretNotFound"), what="SecretNotFound")
        assert "'team-s3'" in pending["status"]["message"] and "--default-s3-secret" in pending["status"]["message"]
        assert await api.get("Job", "dsec-ftj-a1") is None
        refs = await _secret_refs_once_created(api, "team-s3", "dsec-ftj-a1")
        assert refs["AWS_ACCESS_KEY_ID"] == {"name": "team-s3", "key": "AWS_ACCESS_KEY_ID"}


async def _secret_refs_once_created(api: Api, secret: str, job_name: str) -> dict[str, dict[str, Any]]:
    """Create the S3 Secret, wait for the Job it unblocks, and return the secretKeyRefs of its
    container (the credentials themselves never appear in the Job)."""
    await api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret},
                      "stringData": {"AWS_ACCESS_KEY_ID": "AKIA-TEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}})
    job = await eventually(lambda: api.get("Job", job_name), what=f"job after Secret {secret}")
    assert "s3cr3t-value" not in json.dumps(job) and "AKIA-TEST" not in json.dumps(job)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}


async def _reason(api: Api, name: str, reason: str, kind: str = "FineTuneJob") -> dict[str, Any] | None:
    obj = await api.get(kind, name)
    return obj if obj and (obj.get("status") or {}).get("reason") == reason else None


async def test_suspend_and_resume(api: Api) -> None:
    async with running_operator():
        await api.create(finetunejob("sus"))
        await eventually(lambda: api.get("Job", "sus-ftj-a1"))
        await api.job_status("sus-ftj-a1", {"active": 2})
        await eventually(lambda: _phase(api, "FineTuneJob", "sus", "Running"))
        await api.patch("FineTuneJob", "sus", {"spec": {"suspend": True}})
        await eventually(lambda: _phase(api, "FineTuneJob", "sus", "Suspended"))
        job = await eventually(lambda: _job_suspended(api, "sus-ftj-a1", True), what="job suspended")
        await api.job_status("sus-ftj-a1", {"active": 0})
        await api.patch("FineTuneJob", "sus", {"spec": {"suspend": False}})
        await eventually(lambda: _job_suspended(api, "sus-ftj-a1", False), what="job resumed")
        await api.job_status("sus-ftj-a1", {"active": 2})
        running = await eventually(lambda: _phase(api, "FineTuneJob", "sus", "Running"))
        assert running["status"]["attempts"] == 1
        assert job


async def _job_suspended(api: Api, name: str, value: bool) -> dict[str, Any] | None:
    job = await api.get("Job", name)
    return job if job and bool(job["spec"].get("suspend")) == value else None


async def test_training_spec_immutable_after_start(api: Api) -> None:
    async with running_operator():
        await api.create(finetunejob("imm"))
        await eventually(lambda: api.get("Job", "imm-ftj-a1"))
        await api.patch("FineTuneJob", "imm", {"spec": {"training": {"train": {"maxSteps": 5000}}}})
        changed = await eventually(lambda: _spec_invalid(api, "imm"), what="immutable condition")
        assert _condition(changed, "SpecValid")["reason"] == "TrainingSpecImmutable"
        assert "TrainingSpecImmutable" in [e["reason"] for e in await api.events("imm")]
        config = await api.get("ConfigMap", "imm-ftj-config")
        assert "maxSteps: 100\n" in config["data"]["job.yaml"]
        assert await api.get("Job", "imm-ftj-a2") is None


async def _spec_invalid(api: Api, name: str) -> dict[str, Any] | None:
    obj = await api.get("FineTuneJob", name)
    for cond in (obj or {}).get("status", {}).get("conditions") or []:
        if cond["type"] == "SpecValid" and cond["status"] == "False":
            return obj
    return None


async def test_operator_restart_creates_no_duplicates(api: Api) -> None:
    async with running_operator():
        cr = await api.create(finetunejob("rs"))
        await eventually(lambda: _wait_children(api, cr, {"ConfigMap": 1, "Service": 1, "Job": 1}))
    before = {kind: len(await api.list(kind)) for kind in ("ConfigMap", "Service", "Job")}
    # Forget the status (as if the first operator died before writing it): the new operator
    # must adopt the existing children, not create a second Job.
    await api.patch("FineTuneJob", "rs", {"status": None}, subresource="status")
    async with running_operator():
        await eventually(lambda: _phase(api, "FineTuneJob", "rs", "Pending"), what="adopted")
        await api.job_status("rs-ftj-a1", {"active": 2})
        running = await eventually(lambda: _phase(api, "FineTuneJob", "rs", "Running"))
        assert running["status"]["attempts"] == 1
    after = {kind: len(await api.list(kind)) for kind in ("ConfigMap", "Service", "Job")}
    assert after == before == {"ConfigMap": 1, "Service": 1, "Job": 1}


async def test_delete_removes_children_and_nothing_is_recreated(api: Api) -> None:
    async with running_operator():
        cr = await api.create(finetunejob("gone"))
        children = await eventually(lambda: _wait_children(api, cr, {"ConfigMap": 1, "Service": 1, "Job": 1}))
        for kind, names in children.items():
            for name in names:
                obj = await api.get(kind, name)
                (ref,) = obj["metadata"]["ownerReferences"]
                assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "gone",
                               "uid": cr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert not await _forgotten("FineTuneJob", "gone")
        await api.delete("FineTuneJob", "gone")
        await eventually(lambda: _gone(api, "FineTuneJob", "gone"), what="CR deleted (kopf released its finalizer)")
        await eventually(lambda: _no_children(api), what="children garbage-collected")
        # Nothing may come back: wait until the operator itself has reconciled the deleted
        # resource (the Jobs' deletion events); a reconcile that raced the deletion holds the
        # same per-resource lock, so it has finished by then, and any Job it made is listed.
        await eventually(lambda: _forgotten("FineTuneJob", "gone"), what="the operator saw the deletion")
        assert await api.list("Job") == []
    assert await api.list("Job") == []


async def _gone(api: Api, kind: str, name: str) -> bool:
    return await api.get(kind, name) is None


async def _forgotten(kind: str, name: str) -> bool:
    """The in-process operator found the resource gone (it forgets its phase metric then)."""
    from kubetune.operator import metrics

    with metrics._guard:
        return (kind, NAMESPACE, name) not in metrics._phases


async def _no_children(api: Api) -> bool:
    return all([not await api.list(kind) for kind in ("ConfigMap", "Service", "Job")])


async def test_alignment_job_waits_for_its_finetunejob(api: Api) -> None:
    async with running_operator():
        await api.create({
            "apiVersion": "kubetune.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "dpo"},
            "spec": {
                "nodes": 1, "gpusPerNode": 8,
                "baseModelFrom": {"fineTuneJob": "base"},
                "training": {"stage": "dpo", "model": {}, "data": {"datasets": [{"path": "s3://data/prefs.jsonl"}]},
                             "output": {"path": "s3://outputs/dpo"}},
            },
        })
        await eventually(lambda: _reason(api, "dpo", "ReferenceNotFound", "AlignmentJob"), what="ReferenceNotFound")
        await api.create(finetunejob("base"))
        await eventually(lambda: _reason(api, "dpo", "WaitingForReference", "AlignmentJob"), what="waiting")
        await eventually(lambda: api.get("Job", "base-ftj-a1"))
        assert await api.get("Job", "dpo-alj-a1") is None
        await api.job_status("base-ftj-a1", {"conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: _phase(api, "FineTuneJob", "base", "Succeeded"))
        job = await eventually(lambda: api.get("Job", "dpo-alj-a1"), what="alignment job started")
        assert job["spec"]["completions"] == 1
        config = await api.get("ConfigMap", "dpo-alj-config")
        assert "path: s3://outputs/base\n" in config["data"]["job.yaml"]
        dpo = await api.get("AlignmentJob", "dpo")
        assert dpo["status"]["baseModelUri"] == "s3://outputs/base"
        assert _condition(dpo, "DependenciesReady")["status"] == "True"


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch):
    """moto's S3 server; the operator reads status.json with its own (ambient) credentials."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="outputs")
    yield client
    server.stop()


async def test_progress_from_status_json_in_s3(api: Api, s3: Any) -> None:
    async with running_operator():
        await api.create(finetunejob("prog"))
        await eventually(lambda: api.get("Job", "prog-ftj-a1"))
        await api.job_status("prog-ftj-a1", {"active": 2, "ready": 2})
        await eventually(lambda: _phase(api, "FineTuneJob", "prog", "Running"))
        status = {"phase": "Running", "step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 1.25,
                  "tokensPerSecond": 5120.5, "etaSeconds": 90.0, "updatedAt": time.time(),
                  "lastCheckpoint": "s3://outputs/prog/checkpoint-40"}
        await asyncio.to_thread(s3.put_object, Bucket="outputs", Key="prog/status.json", Body=json.dumps(status).encode())
        cr = await eventually(lambda: _progress_step(api, "prog", 40), what="progress in status")
        progress = cr["status"]["progress"]
        assert progress["percent"] == 40.0 and progress["loss"] == 1.25 and progress["totalSteps"] == 100
        assert progress["lastCheckpoint"] == "s3://outputs/prog/checkpoint-40"
        assert progress["tokensPerSecond"] == 5120.5
        # status.json is written by user code: out-of-range numbers crashed every reconcile
        # (OverflowError), so the job never reached Succeeded.
        hostile = {**status, "step": 10**400, "updatedAt": 1e20, "outputUri": "-x", "state": "s" * 10_000}
        await asyncio.to_thread(s3.put_object, Bucket="outputs", Key="prog/status.json", Body=json.dumps(hostile).encode())
        await api.job_status("prog-ftj-a1", {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]})
        done = await eventually(lambda: _phase(api, "FineTuneJob", "prog", "Succeeded"), what="Succeeded")
        assert done["status"]["outputUri"] == "s3://outputs/prog"


async def _progress_step(api: Api, name: str, step: int) -> dict[str, Any] | None:
    obj = await api.get("FineTuneJob", name)
    return obj if ((obj or {}).get("status", {}).get("progress") or {}).get("step") == step else None
