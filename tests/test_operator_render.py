"""Rendering: a training resource -> ConfigMap, headless Service, Indexed Job (pure functions)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.operator.common import dns_label, label_value
from kubetune.operator.training.render import render_training
from kubetune.trainer.cli.specfiles import load_spec
from tests.test_operator_crds import EXAMPLE_FTJ

K8S_VERSION = kubernetes_validate.latest_version()


def _cr(**spec: Any) -> dict[str, Any]:
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"]["uid"] = "6f1c0d9e-uid"
    cr["spec"].update(spec)
    return cr


def _by_kind(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objs}


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"nodes": 1, "gpusPerNode": 0, "storage": {}, "env": [], "tolerations": [], "affinity": None},
        {"nodes": 16, "gpusPerNode": 8, "suspend": True, "ttlSecondsAfterFinished": 60,
         "priorityClassName": "high", "serviceAccountName": "trainer", "imagePullPolicy": "Always",
         "storage": {"secretRef": {"name": "s3", "sessionTokenKey": "token"}}},
    ],
)
def test_every_child_validates_against_kubernetes_schemas(spec: dict[str, Any]) -> None:
    objs = render_training(_cr(**spec), attempt=3)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    for obj in objs:
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_indexed_job_gang() -> None:
    job = _by_kind(render_training(_cr()))["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0  # any failed pod fails the attempt; the operator restarts the gang
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
        # preemption/eviction/drain ends the attempt too; the operator restarts it without counting it
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert spec["activeDeadlineSeconds"] == 86400
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "llama-sft-ftj"
    assert pod["terminationGracePeriodSeconds"] == 300


def test_torchrun_argument_list_without_shell() -> None:
    container = _container(_by_kind(render_training(_cr()))["Job"])
    assert container["command"] == ["torchrun"]
    assert container["args"] == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(KUBETUNE_NODE_RANK)",
        "--master-addr=$(KUBETUNE_MASTER_ADDR)",
        "--master-port=29500",
        "--max-restarts=0",
        "--no-python",
        "kubetune",
        "train",
        "/etc/kubetune/job.yaml",
    ]
    env = {e["name"]: e for e in container["env"]}
    # Every $(VAR) in the arguments is defined in the container's own environment.
    for arg in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, var
    assert env["KUBETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["KUBETUNE_MASTER_ADDR"]["value"] == "llama-sft-ftj-a1-0.llama-sft-ftj.ml.svc"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert env["NCCL_DEBUG"]["value"] == "INFO"  # the user's env wins over the default
    assert [e["name"] for e in container["env"]].count("NCCL_DEBUG") == 1


def test_no_cr_value_reaches_a_shell_or_the_pod_command() -> None:
    evil = "s3://x/$(rm -rf /); `reboot`"
    cr = _cr()
    cr["spec"]["training"]["model"]["path"] = evil
    objs = _by_kind(render_training(cr))
    job_text = json.dumps(objs["Job"])
    assert evil not in job_text and "rm -rf" not in job_text
    assert not any(word in json.dumps(_container(objs["Job"])["command"]) for word in ("sh", "bash", "-c"))
    assert yaml.safe_load(objs["ConfigMap"]["data"]["job.yaml"])["spec"]["training"]["model"]["path"] == evil


def test_pod_security_gpus_shm_and_writable_dirs() -> None:
    job = _by_kind(render_training(_cr()))["Job"]
    pod = job["spec"]["template"]["spec"]
    container = _container(job)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["memory"] == "400Gi"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    for path in ("/tmp", "/cache", "/workspace"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert volumes[mounts["/etc/kubetune"]]["configMap"]["name"] == "llama-sft-ftj-config"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100-SXM"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_s3_credentials_only_by_reference() -> None:
    env = {e["name"]: e for e in _container(_by_kind(render_training(_cr()))["Job"])["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "AWS_SESSION_TOKEN" not in env
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"
    no_secret = {e["name"] for e in _container(_by_kind(render_training(_cr(storage={})))["Job"])["env"]}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & no_secret


def test_headless_service_publishes_not_ready_pods() -> None:
    objs = _by_kind(render_training(_cr()))
    service = objs["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = objs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_single_node_uses_loopback_master_and_cpu_only_pods() -> None:
    job = _by_kind(render_training(_cr(nodes=1, gpusPerNode=0)))["Job"]
    container = _container(job)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_MASTER_ADDR"] == "127.0.0.1"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert "--nproc-per-node=1" in container["args"]
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))


def test_children_have_owner_reference_labels_and_deterministic_names() -> None:
    first = render_training(_cr(), attempt=2)
    assert first == render_training(_cr(), attempt=2)
    for obj in first:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-sft",
                       "uid": "6f1c0d9e-uid", "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert obj["metadata"]["labels"]["kubetune.io/name"] == "llama-sft"
    job = _by_kind(first)["Job"]
    assert job["metadata"]["name"] == "llama-sft-ftj-a2"
    assert job["metadata"]["annotations"]["kubetune.io/attempt"] == "2"


def test_long_and_dotted_names_stay_valid() -> None:
    name = "team.a." + "very-long-fine-tune-job-name-" * 8
    cr = _cr()
    cr["metadata"]["name"] = name.rstrip("-")
    for obj in render_training(cr, attempt=1000):
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    job = _by_kind(render_training(cr, attempt=1000))["Job"]
    assert len(job["metadata"]["name"]) <= 52
    assert len(f"{job['metadata']['name']}-1023") <= 63
    assert dns_label("a.b", "x") != dns_label("a-b", "x")
    assert len(label_value(name)) <= 63
    assert dns_label("7up")[0].isalpha()


def test_job_yaml_is_what_kubetune_train_reads(tmp_path: Path) -> None:
    """The ConfigMap holds the resolved manifest; the trainer loads it like a local file."""
    config = _by_kind(render_training(_cr()))["ConfigMap"]
    path = tmp_path / "job.yaml"
    path.write_text(config["data"]["job.yaml"])
    loaded = load_spec(path)
    assert loaded.kind == "FineTuneJob" and loaded.field_prefix == "spec.training"
    assert loaded.spec.name == "llama-sft"
    assert loaded.spec.model.path == "s3://models/llama-3-8b"
    assert loaded.spec.lora.rank == 16
    assert loaded.spec.data.maxLength == 4096
    document = yaml.safe_load(config["data"]["job.yaml"])
    assert document["spec"]["nodes"] == 2  # the whole resolved resource, cluster fields included
    assert "kubetune.io/training-hash" in config["metadata"]["annotations"]


def test_alignment_job_yaml_resolves_base_model_reference(tmp_path: Path) -> None:
    cr = _cr()
    cr["kind"] = "AlignmentJob"
    cr["metadata"]["name"] = "dpo"
    cr["spec"]["training"]["stage"] = "dpo"
    cr["spec"]["baseModelFrom"] = {"fineTuneJob": "llama-sft"}
    del cr["spec"]["training"]["model"]["path"]
    objs = _by_kind(render_training(cr, references={"baseModelFrom": "s3://outputs/llama-sft"}))
    assert objs["Job"]["metadata"]["name"] == "dpo-alj-a1"
    for obj in objs.values():
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    path = tmp_path / "job.yaml"
    path.write_text(objs["ConfigMap"]["data"]["job.yaml"])
    loaded = load_spec(path)
    assert loaded.kind == "AlignmentJob"
    assert loaded.spec.model.path == "s3://outputs/llama-sft"
    document = yaml.safe_load(path.read_text())
    assert "baseModelFrom" not in document["spec"]
    assert document["metadata"]["annotations"]["kubetune.io/baseModelFrom"] == "FineTuneJob/llama-sft"


def test_prepare_job_tokenizes_once_without_gpus() -> None:
    from kubetune.operator.resources import validate_spec
    from kubetune.operator.training.render import render_prepare_job

    cr = _cr(storage={"secretRef": {"name": "s3"}, "endpoint": "http://minio:9000"},
             resources={"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
             env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}])
    cr["spec"]["training"]["data"]["cache"] = "s3://cache/kubetune/"
    spec = validate_spec(cr["kind"], cr["spec"])
    job = render_prepare_job(cr, spec)
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["metadata"]["name"] == "llama-sft-ftj-prepare"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "6f1c0d9e-uid"
    assert "kubetune.io/attempt" not in job["metadata"].get("annotations", {})  # gang attempts count training only
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    container = _container(job)
    assert container["command"] == ["kubetune"]
    assert container["args"] == ["prepare", "/etc/kubetune/job.yaml"]  # the same ConfigMap as the gang
    assert not any("gpu" in name for part in container["resources"].values() for name in part)
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000" and "HF_TOKEN" in env
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["volumes"][0] == {"name": "job-config", "configMap": {"name": "llama-sft-ftj-config"}}
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "prepare"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] != (
        _by_kind(render_training(cr))["Service"]["spec"]["selector"]["app.kubernetes.io/component"])
