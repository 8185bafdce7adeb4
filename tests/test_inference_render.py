"""InferenceService: the CRD, the pure renderer (Deployment, Service, HPA) and the pure decision
logic (`kubetune.operator.serving.decide.reconcile_service`), without a cluster."""

from __future__ import annotations

import copy
import datetime
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.operator.crdgen import crd
from kubetune.operator.resources import InferenceServiceStatus
from kubetune.operator.serving.decide import ServingObserved, merge_diff, reconcile_service
from kubetune.operator.serving.render import (
    ResolvedModels,
    ServingOptions,
    render_inference,
    selector_string,
)
from kubetune.operator.validation import admit, validate_resource
from kubetune.trainer.api.errors import SpecErrors
from tests.test_operator_crds import _to_jsonschema

K8S_VERSION = kubernetes_validate.latest_version()
NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)

EXAMPLE_ISVC: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "llama-chat", "namespace": "ml", "uid": "isvc-uid", "generation": 1},
    "spec": {
        "model": {"uri": "s3://models/llama-3-8b-instruct"},
        "adapters": [
            {"name": "support", "uri": "s3://outputs/support-lora"},
            {"name": "legal", "fromJob": {"fineTuneJob": "legal-sft"}},
        ],
        "engine": "vllm",
        "gpus": 2,
        "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        "minReplicas": 1,
        "maxReplicas": 4,
        "autoscaling": {"metric": "requestsInFlight", "target": 16},
        "engineArgs": {"maxModelLen": 8192, "dtype": "bfloat16", "quantization": "fp8",
                       "extraArgs": ["--enable-prefix-caching"]},
        "cache": {"type": "hostPath", "subPath": "llama"},
        "storage": {"secretRef": {"name": "s3-creds"}, "endpoint": "http://minio.minio:9000"},
        "nodeSelector": {"nvidia.com/gpu.product": "H100-SXM"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
MODELS = ResolvedModels("s3://models/llama-3-8b-instruct",
                        {"support": "s3://outputs/support-lora", "legal": "s3://outputs/legal-sft"})


def _cr(**spec: Any) -> dict[str, Any]:
    cr = copy.deepcopy(EXAMPLE_ISVC)
    cr["spec"].update(spec)
    return cr


def _by_kind(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objs}


def _pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(objs)["Deployment"]["spec"]["template"]["spec"]


# -- CRD ----------------------------------------------------------------------------------------


def test_crd_scale_subresource_columns_and_names() -> None:
    body = crd("InferenceService")
    assert kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    names = body["spec"]["names"]
    assert names["shortNames"] == ["kisvc"] and names["categories"] == ["kubetune"]
    version = body["spec"]["versions"][0]
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".status.selector"},
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["URL"] == ".status.url"
    assert columns["Ready"] == ".status.readyReplicas" and columns["Age"] == ".metadata.creationTimestamp"
    validator = jsonschema.Draft4Validator(_to_jsonschema(version["schema"]["openAPIV3Schema"]))
    validator.validate(EXAMPLE_ISVC)
    bad = _cr(engine="tgi")
    assert any("is not one of" in e.message for e in validator.iter_errors(bad))


def test_status_schema_accepts_what_the_operator_writes() -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(deployment=_deployment(ready=1)), NOW)
    InferenceServiceStatus.model_validate(plan.status)
    version = crd("InferenceService")["spec"]["versions"][0]
    jsonschema.Draft4Validator(_to_jsonschema(version["schema"]["openAPIV3Schema"])).validate(
        {**EXAMPLE_ISVC, "status": plan.status}
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": {"uri": "s3://m", "fromJob": {"fineTuneJob": "x"}}}, "exactly one of uri or fromJob"),
        ({"model": {"uri": "--trust-remote-code"}}, "spec.model.uri"),
        ({"adapters": [{"name": "a", "uri": "s3://a"}, {"name": "a", "uri": "s3://b"}]}, "unique"),
        ({"adapters": [{"name": "a/b", "uri": "s3://a"}]}, "spec.adapters[0].name"),
        ({"minReplicas": 3, "maxReplicas": 2}, "below minReplicas"),
        ({"engine": "transformers"}, "needs engine vllm"),
        ({"tensorParallelSize": 4}, "exceeds gpus"),
        ({"autoscaling": {"metric": "cpu"}, "resources": {}}, "resources.requests.cpu"),
        ({"cache": {"type": "pvc"}}, "claimName"),
    ],
)
def test_invalid_specs_are_refused_with_the_field(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecErrors) as info:
        validate_resource(_cr(**change))
    assert fragment in str(info.value)


def test_admission_accepts_and_refuses() -> None:
    assert admit("CREATE", None, EXAMPLE_ISVC) == []
    from kubetune.operator.validation import AdmissionRefused

    with pytest.raises(AdmissionRefused, match="maxReplicas"):
        admit("UPDATE", EXAMPLE_ISVC, _cr(maxReplicas=0))


# -- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"engine": "transformers", "gpus": 0, "adapters": [], "minReplicas": 2, "maxReplicas": 2, "engineArgs": {},
         "cache": {}, "resources": {}, "storage": {}, "nodeSelector": {}, "tolerations": []},
        {"autoscaling": {"metric": "cpu"}, "cache": {"type": "pvc", "claimName": "models"}, "serviceType": "LoadBalancer",
         "shmSize": "16Gi", "priorityClassName": "serving", "serviceAccountName": "irsa", "imagePullPolicy": "Always",
         "engineArgs": {"draftModel": "s3://models/llama-68m", "numSpeculativeTokens": 5},
         "storage": {"secretRef": {"name": "s3", "sessionTokenKey": "token"}},
         "env": [{"name": "KUBETUNE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}}]},
        {"autoscaling": {"metric": "queueDepth"}, "cache": {"type": "emptyDir", "sizeLimit": "100Gi"}},
    ],
)
def test_every_child_validates_against_kubernetes_schemas(spec: dict[str, Any]) -> None:
    objs = render_inference(_cr(**spec), MODELS)
    for obj in objs:
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True), obj["kind"]
    kinds = [o["kind"] for o in objs]
    autoscaled = (spec.get("maxReplicas", 4) or 0) > spec.get("minReplicas", 1)
    budget = spec.get("minReplicas", 1) >= 2
    assert kinds == ["Deployment", "Service", "ConfigMap"] + (["HorizontalPodAutoscaler"] if autoscaled else []) + (
        ["PodDisruptionBudget"] if budget else [])


@pytest.mark.parametrize(
    ("autoscaling", "metric"),
    [
        ({"metric": "requestsInFlight", "target": 16},
         {"type": "Pods", "pods": {"metric": {"name": "kubetune_requests_in_flight"},
                                   "target": {"type": "AverageValue", "averageValue": "16"}}}),
        ({"metric": "queueDepth"},
         {"type": "Pods", "pods": {"metric": {"name": "kubetune_queue_depth"},
                                   "target": {"type": "AverageValue", "averageValue": "4"}}}),
        ({"metric": "cpu"},
         {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}),
    ],
)
def test_hpa_targets_the_deployment_and_the_metric(autoscaling: dict[str, Any], metric: dict[str, Any]) -> None:
    objs = _by_kind(render_inference(_cr(autoscaling=autoscaling), MODELS))
    hpa, deployment = objs["HorizontalPodAutoscaler"], objs["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 4
    assert hpa["spec"]["metrics"] == [metric]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # The metric the HPA reads is one the pods export, and Prometheus scrapes the pods.
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    if metric["type"] == "Pods":
        from kubetune.trainer.serve.metrics import ServerMetrics

        exported = ServerMetrics().render()[0].decode()
        assert metric["pods"]["metric"]["name"] in exported


def test_no_hpa_when_min_equals_max_and_replicas_from_spec() -> None:
    objs = _by_kind(render_inference(_cr(minReplicas=2, maxReplicas=None, replicas=5), MODELS))
    assert "HorizontalPodAutoscaler" not in objs
    assert objs["Deployment"]["spec"]["replicas"] == 5
    objs = _by_kind(render_inference(_cr(minReplicas=3, maxReplicas=3), MODELS))
    assert objs["Deployment"]["spec"]["replicas"] == 3


def test_pod_commands_are_argument_lists_without_shell() -> None:
    pod = _pod(render_inference(_cr(), MODELS))
    permissions, fetch = pod["initContainers"]
    server, agent = pod["containers"]
    assert permissions["command"] == ["chown", "1000:1000", "/var/cache/kubetune"]
    assert fetch["command"] == ["python", "-m", "kubetune.trainer.serve.fetch"]
    # vLLM: the adapters come from the mounted ConfigMap, not from the pod template.
    assert fetch["args"] == ["--model", "s3://models/llama-3-8b-instruct",
                             "--adapters-file", "/etc/kubetune/adapters/adapters.json"]
    assert server["command"] == ["kubetune"]
    assert server["args"] == [
        "serve", "s3://models/llama-3-8b-instruct", "--engine", "vllm", "--served-model-name", "llama-chat",
        "--host", "0.0.0.0", "--port", "8000", "--dtype", "bfloat16", "--drain-timeout", "50",
        "--max-model-len", "8192", "--tensor-parallel-size", "2", "--quantization", "fp8",
        "--vllm-arg=--enable-lora", "--vllm-arg=--max-loras=4",
        "--vllm-arg=--enable-prefix-caching",
    ]
    assert agent["command"] == ["python", "-m", "kubetune.trainer.serve.adapters"]
    assert agent["args"] == ["--config", "/etc/kubetune/adapters/adapters.json", "--server", "http://127.0.0.1:8000",
                             "--port", "8001", "--keep", "llama-chat"]
    # The transformers engine (`kubetune serve`) loads adapters at runtime too: the same sidecar,
    # no adapter in the pod template, and no LoRA start-up flags.
    transformers = _pod(render_inference(_cr(engine="transformers", engineArgs={}), MODELS))
    t_fetch, (t_server, t_agent) = transformers["initContainers"][-1], transformers["containers"]
    assert t_fetch["args"] == ["--model", "s3://models/llama-3-8b-instruct",
                               "--adapters-file", "/etc/kubetune/adapters/adapters.json"]
    assert "--adapter" not in t_server["args"] and not any("vllm" in a for a in t_server["args"][4:])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in t_server["env"]}
    assert t_agent["args"] == agent["args"]
    for container in (permissions, fetch, server, agent, t_fetch, t_server, t_agent):
        text = json.dumps(container["command"])
        assert not any(word in text for word in ('"sh"', '"bash"', '"-c"'))
        env = {e["name"] for e in container.get("env", [])}
        for arg in container.get("args", []):
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in env


def test_the_serve_arguments_parse_with_kubetune_serve() -> None:
    """The server container's args are what `kubetune serve` accepts."""
    from kubetune.trainer.cli.main import build_parser

    for spec in ({}, {"engine": "transformers", "gpus": 0, "engineArgs": {"draftModel": "s3://d", "numSpeculativeTokens": 3}}):
        server = _pod(render_inference(_cr(**spec), MODELS))["containers"][0]
        args = build_parser().parse_args(server["args"])
        assert args.model == "s3://models/llama-3-8b-instruct"
        assert args.adapter == []  # either engine: the adapters come at runtime
        if not spec:  # vLLM: LoRA on with a fixed capacity
            assert args.vllm_arg[:2] == ["--enable-lora", "--max-loras=4"]
        assert args.engine == spec.get("engine", "vllm")
    assert args.draft_model == "s3://d" and args.num_assistant_tokens == 3


def test_probes_drain_rollout_and_security() -> None:
    objs = _by_kind(render_inference(_cr(), MODELS))
    deployment = objs["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = deployment["spec"]["template"]["spec"]
    server, agent = pod["containers"]
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 1800
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"  # vLLM answers once loaded
    transformers = _pod(render_inference(_cr(engine="transformers", gpus=1, engineArgs={}), MODELS))["containers"][0]
    assert transformers["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    assert pod["terminationGracePeriodSeconds"] == 60
    assert int(server["args"][server["args"].index("--drain-timeout") + 1]) + 5 < 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    permissions, fetch = pod["initContainers"]
    assert permissions["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    for container in (server, fetch, agent):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["runAsNonRoot"] is True
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in json.dumps(fetch.get("resources", {})) + json.dumps(agent["resources"])
    assert agent["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "agent"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert volumes[mounts["/var/cache/kubetune"]]["hostPath"] == {"path": "/var/lib/kubetune/cache/ml/llama", "type": "DirectoryOrCreate"}
    for path in ("/tmp", "/cache", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]]
    env = {e["name"]: e for e in server["env"]}
    assert env["KUBETUNE_CACHE"]["value"] == "/var/cache/kubetune"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"


def test_hostpath_cache_is_handed_to_the_pods_user_first() -> None:
    """fsGroup does not apply to hostPath volumes and the kubelet creates the directory owned by
    root: a root init container with only CAP_CHOWN gives it to uid 1000 before the fetch."""
    pod = _pod(render_inference(_cr(), MODELS))
    permissions = pod["initContainers"][0]
    assert permissions["name"] == "cache-permissions"
    assert permissions["command"] == ["chown", "1000:1000", "/var/cache/kubetune"] and "args" not in permissions
    assert permissions["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}
    assert permissions["volumeMounts"] == [{"name": "model-cache", "mountPath": "/var/cache/kubetune"}]
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["initContainers"][1]["name"] == "fetch"
    for cache in ({"type": "emptyDir"}, {"type": "pvc", "claimName": "models"}):  # fsGroup covers these
        assert [c["name"] for c in _pod(render_inference(_cr(cache=cache), MODELS))["initContainers"]] == ["fetch"]


@pytest.mark.slow  # runs the container's command as root in a subprocess
def test_hostpath_permissions_container_makes_the_cache_writable_for_uid_1000() -> None:
    """The rendered command for real: a root-owned 0755 directory (what the kubelet creates)
    becomes writable for the pods' user."""
    import os
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to create a root-owned directory and switch to uid 1000")
    with tempfile.TemporaryDirectory(prefix="kubetune-hostpath-") as node:  # in /tmp: uid 1000 can reach it
        Path(node).chmod(0o755)
        _check_hostpath_permissions(Path(node) / "kubetune-cache")


def _check_hostpath_permissions(node_dir: Path) -> None:
    import subprocess

    node_dir.mkdir(mode=0o755)
    (permissions,) = [c for c in _pod(render_inference(_cr(), MODELS))["initContainers"] if c["name"] == "cache-permissions"]
    as_user = {"user": 1000, "group": 1000, "extra_groups": []}
    assert subprocess.run(["touch", str(node_dir / "before")], capture_output=True, **as_user).returncode != 0
    argv = [a.replace("/var/cache/kubetune", str(node_dir)) for a in permissions["command"]]
    subprocess.run(argv, check=True)
    subprocess.run(["mkdir", "-p", str(node_dir / "s3" / "bucket")], check=True, **as_user)
    assert (node_dir / "s3" / "bucket").stat().st_uid == 1000


def test_operator_s3_defaults_apply_only_where_the_resource_sets_none() -> None:
    from kubetune.operator.common import StorageDefaults

    options = ServingOptions(storage_defaults=StorageDefaults(endpoint="http://minio.platform:9000", secret="team-s3"))

    def env_of(cr: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
        pod = _pod(render_inference(cr, MODELS, options))
        return [{e["name"]: e for e in c.get("env", [])} for c in pod["initContainers"] + pod["containers"]
                if c["name"] != "cache-permissions"]

    for env in env_of(_cr(storage={})):  # fetch, server and the adapters sidecar
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.platform:9000"
        assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {
            "name": "team-s3", "key": "AWS_ACCESS_KEY_ID"}}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    for env in env_of(_cr()):  # the resource's own endpoint and Secret win
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    for env in env_of(_cr(storage={}, serviceAccountName="irsa")):  # pod identity: no default Secret
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.platform:9000"
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    # Without operator defaults nothing is added.
    pod = _pod(render_inference(_cr(storage={}), MODELS))
    assert not any(e["name"].startswith("AWS_") for c in pod["containers"] for e in c["env"])


def test_operator_s3_defaults_reach_training_pods() -> None:
    from kubetune.operator.common import StorageDefaults
    from kubetune.operator.training.render import RenderOptions, render_training
    from tests.test_operator_render import _cr as training_cr

    options = RenderOptions(storage_defaults=StorageDefaults(endpoint="http://minio.platform:9000", secret="team-s3"))
    cr = training_cr()
    cr["spec"].pop("storage", None)
    cr["spec"].pop("serviceAccountName", None)
    job = next(o for o in render_training(cr, options=options) if o["kind"] == "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.platform:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    cr["spec"]["storage"] = {"secretRef": {"name": "own"}, "endpoint": "http://own:9000"}
    job = next(o for o in render_training(cr, options=options) if o["kind"] == "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://own:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "own"


def test_operator_flags_set_the_s3_defaults() -> None:
    import argparse

    from kubetune.operator.cli import register
    from kubetune.operator.common import StorageDefaults
    from kubetune.operator.config import config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["operator", "--default-s3-endpoint", "http://minio:9000", "--default-s3-secret", "team-s3"])
    config = config_from_args(args, {})
    assert config.serving.storage_defaults == StorageDefaults("http://minio:9000", "team-s3")
    assert config.training.storage_defaults == config.serving.storage_defaults


def test_service_selects_the_pods_and_names_are_deterministic() -> None:
    objs = _by_kind(render_inference(_cr(), MODELS))
    service, deployment = objs["Service"], objs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert selector_string("llama-chat") == ",".join(f"{k}={v}" for k, v in sorted(service["spec"]["selector"].items()))
    for obj in objs.values():
        assert obj["metadata"]["name"] == "llama-chat-isvc" + ("-adapters" if obj["kind"] == "ConfigMap" else "")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "InferenceService" and ref["uid"] == "isvc-uid" and ref["controller"] is True
    assert render_inference(_cr(), MODELS) == render_inference(_cr(), MODELS)
    options = ServingOptions(default_image="registry/kubetune-server:9")
    assert _pod(render_inference(_cr(), MODELS, options))["containers"][0]["image"] == "registry/kubetune-server:9"


def test_hostile_values_stay_single_arguments() -> None:
    cr = _cr(model={"uri": "s3://x/$(reboot);`halt`"}, engineArgs={"extraArgs": ["--x; rm -rf /"]})
    pod = _pod(render_inference(cr, ResolvedModels("s3://x/$(reboot);`halt`")))
    server = pod["containers"][0]
    assert "s3://x/$(reboot);`halt`" in server["args"]  # one argv element; no shell ever parses it
    assert "--vllm-arg=--x; rm -rf /" in server["args"]


# -- decision logic -----------------------------------------------------------------------------


def _job(phase: str | None, name: str = "legal-sft", output: str = "s3://outputs/legal-sft") -> dict[str, Any]:
    return {"kind": "FineTuneJob", "metadata": {"name": name}, "spec": {"training": {"output": {"path": output}}},
            "status": {"phase": phase} if phase else {}}


def _deployment(ready: int = 0, replicas: int = 1, updated: int | None = None, cr: dict[str, Any] | None = None,
                **status: Any) -> dict[str, Any]:
    objs = _by_kind(render_inference(cr or EXAMPLE_ISVC, MODELS))
    dep = objs["Deployment"]
    dep["metadata"]["generation"] = 1
    dep["status"] = {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready, "availableReplicas": ready,
                     "updatedReplicas": replicas if updated is None else updated, **status}
    return dep


def _observed(**kwargs: Any) -> ServingObserved:
    objs = _by_kind(render_inference(EXAMPLE_ISVC, MODELS))
    base: dict[str, Any] = {"secret_found": True, "references": {"FineTuneJob/legal-sft": _job("Succeeded")}}
    if "deployment" in kwargs:
        base.update(service=objs["Service"], hpa=objs["HorizontalPodAutoscaler"], adapters_config=objs["ConfigMap"])
    base.update(kwargs)
    return ServingObserved(**base)


def _cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.mark.parametrize(
    ("job", "reason", "phase"),
    [
        (None, "ReferenceNotFound", "Pending"),
        (_job("Running"), "WaitingForReference", "Pending"),
        (_job(None), "WaitingForReference", "Pending"),
        (_job("Failed"), "ReferenceFailed", "Failed"),
    ],
)
def test_reference_not_succeeded_keeps_the_service_pending(job: Any, reason: str, phase: str) -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(references={"FineTuneJob/legal-sft": job}), NOW)
    assert plan.create == [] and plan.patch == []
    assert plan.status["phase"] == phase and plan.status["reason"] == reason
    cond = _cond(plan.status, "DependenciesReady")
    assert cond["status"] == "False" and "spec.adapters[1].fromJob: FineTuneJob 'legal-sft'" in cond["message"]
    assert [e.reason for e in plan.events] == [reason]


def test_missing_secret_waits() -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(secret_found=False), NOW)
    assert plan.create == [] and plan.status["reason"] == "SecretNotFound"
    # The operator's default Secret, missing in the service's namespace: the message says so.
    from kubetune.operator.common import StorageDefaults

    options = ServingOptions(storage_defaults=StorageDefaults(secret="team-s3"))
    plan = reconcile_service(_cr(storage={}), _observed(secret_found=False), NOW, options)
    assert plan.status["reason"] == "SecretNotFound" and "default S3 Secret" in plan.status["message"]
    assert "'team-s3'" in plan.status["message"]
    assert reconcile_service(_cr(storage={}), _observed(secret_found=False), NOW).status["phase"] == "Deploying"


def test_succeeded_reference_creates_children_with_its_output() -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(), NOW)
    assert [o["kind"] for o in plan.create] == ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"]
    adapters = json.loads(plan.create[0]["data"]["adapters.json"])["adapters"]
    assert {"name": "legal", "uri": "s3://outputs/legal-sft"} in adapters  # the reference, resolved
    status = plan.status
    assert status["phase"] == "Deploying" and status["observedGeneration"] == 1
    assert status["url"] == "http://llama-chat-isvc.ml.svc/v1"
    assert status["servedModels"] == ["llama-chat", "support", "legal"]
    assert status["adapters"][1] == {"name": "legal", "uri": "s3://outputs/legal-sft"}
    assert status["selector"] == selector_string("llama-chat")
    assert _cond(status, "DependenciesReady")["status"] == "True"


def test_ready_and_idempotent() -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(deployment=_deployment(ready=1)), NOW)
    assert plan.create == plan.patch == plan.delete == []
    assert plan.status["phase"] == "Ready" and plan.status["readyReplicas"] == 1 and plan.status["replicas"] == 1
    assert _cond(plan.status, "Ready")["status"] == "True"
    assert _cond(plan.status, "Progressing")["reason"] == "RolloutComplete"
    again = reconcile_service({**EXAMPLE_ISVC, "status": plan.status}, _observed(deployment=_deployment(ready=1)), NOW)
    assert again.status == plan.status and again.events == []


def test_adding_an_adapter_to_vllm_restarts_nothing() -> None:
    """vLLM: an adapter-only change patches the adapters ConfigMap and leaves the Deployment
    alone (no new pod template, no rollout); the pods' sidecar loads it at runtime."""
    status = reconcile_service(EXAMPLE_ISVC, _observed(deployment=_deployment(ready=1)), NOW).status
    cr = _cr(adapters=[*EXAMPLE_ISVC["spec"]["adapters"], {"name": "sales", "uri": "s3://outputs/sales"}])
    cr["status"] = status
    plan = reconcile_service(cr, _observed(deployment=_deployment(ready=1)), NOW)
    ((kind, name, patch),) = plan.patch
    assert (kind, name) == ("ConfigMap", "llama-chat-isvc-adapters")
    assert json.loads(patch["data"]["adapters.json"])["adapters"][-1] == {"name": "sales", "uri": "s3://outputs/sales"}
    assert plan.status["servedModels"] == ["llama-chat", "support", "legal", "sales"]
    assert [e.reason for e in plan.events] == ["AdaptersUpdated"]
    assert "adapters added: sales" in plan.events[0].message and "without a restart" in plan.events[0].message
    # Removing one: the same, no rollout.
    cr = _cr(adapters=EXAMPLE_ISVC["spec"]["adapters"][:1])
    cr["status"] = status
    plan = reconcile_service(cr, _observed(deployment=_deployment(ready=1)), NOW)
    assert [k for k, _, _ in plan.patch] == ["ConfigMap"] and "adapters removed: legal" in plan.events[0].message


def test_adapters_with_transformers_restart_nothing_lora_switched_on_rolls() -> None:
    """The transformers engine loads adapters at runtime with no start-up setting: even the first
    adapter (and removing the last) only patches the ConfigMap."""
    base = _cr(engine="transformers", engineArgs={}, adapters=[])
    empty = ResolvedModels(MODELS.model)
    deployed = _deployment(ready=1, cr=base)  # rendered with MODELS' adapters: the same template
    observed = _observed(deployment=deployed, adapters_config=_by_kind(render_inference(base, empty))["ConfigMap"])
    status = reconcile_service(base, observed, NOW).status
    for adapters in ([{"name": "sales", "uri": "s3://outputs/sales"}],
                     [*EXAMPLE_ISVC["spec"]["adapters"], {"name": "sales", "uri": "s3://outputs/sales"}]):
        cr = _cr(engine="transformers", engineArgs={}, adapters=adapters)
        cr["status"] = status
        plan = reconcile_service(cr, observed, NOW)
        assert [k for k, _, _ in plan.patch] == ["ConfigMap"]
        assert [e.reason for e in plan.events] == ["AdaptersUpdated"]
        assert "adapters added: " in plan.events[0].message and "sales" in plan.events[0].message
    transformers = render_inference(_cr(engine="transformers", engineArgs={}), MODELS)[0]["spec"]
    assert transformers == render_inference(base, empty)[0]["spec"]

    # vLLM without adapters has LoRA off; the first adapter turns it on: one rollout. With
    # engineArgs.maxLoras it is on from the start, and the first adapter is a runtime load.
    def template(spec: dict[str, Any]) -> Any:
        return render_inference(_cr(**spec), MODELS if spec.get("adapters") else ResolvedModels(MODELS.model))[0]["spec"]
    one = [{"name": "support", "uri": "s3://outputs/support-lora"}]
    assert template({"adapters": []}) != template({"adapters": one})
    assert "--vllm-arg=--enable-lora" not in json.dumps(template({"adapters": []}))
    on = {"engineArgs": {"maxLoras": 2, "maxLoraRank": 64}}
    assert template({"adapters": [], **on}) == template({"adapters": one, **on}) == template({"adapters": EXAMPLE_ISVC["spec"]["adapters"], **on})
    args = template({"adapters": [], **on})["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--vllm-arg=--max-loras=2", "--vllm-arg=--max-lora-rank=64"]


def test_turning_autoscaling_off_deletes_the_hpa_and_scale_sets_replicas() -> None:
    cr = _cr(maxReplicas=None, replicas=3)
    plan = reconcile_service(cr, _observed(deployment=_deployment(ready=1)), NOW)
    assert ("HorizontalPodAutoscaler", "llama-chat-isvc") in plan.delete
    ((_, _, patch),) = plan.patch
    assert patch["spec"]["replicas"] == 3


def test_progress_deadline_fails_and_rollout_is_reported() -> None:
    stuck = _deployment(ready=0, conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                              "message": "ReplicaSet has timed out progressing."}])
    plan = reconcile_service(EXAMPLE_ISVC, _observed(deployment=stuck), NOW)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "ProgressDeadlineExceeded"
    rolling = _deployment(ready=1, replicas=2, updated=1)
    plan = reconcile_service(EXAMPLE_ISVC, _observed(deployment=rolling), NOW)
    assert plan.status["phase"] == "Ready" and _cond(plan.status, "Progressing")["status"] == "True"


def test_deployed_service_keeps_serving_while_a_new_reference_waits() -> None:
    status = reconcile_service(EXAMPLE_ISVC, _observed(deployment=_deployment(ready=1)), NOW).status
    cr = _cr(adapters=[*EXAMPLE_ISVC["spec"]["adapters"], {"name": "new", "fromJob": {"fineTuneJob": "new-sft"}}])
    cr["status"] = status
    refs = {"FineTuneJob/legal-sft": _job("Succeeded"), "FineTuneJob/new-sft": _job("Running", "new-sft")}
    plan = reconcile_service(cr, _observed(deployment=_deployment(ready=1), references=refs), NOW)
    assert plan.patch == [] and plan.create == []
    assert plan.status["phase"] == "Ready"
    assert _cond(plan.status, "DependenciesReady")["reason"] == "WaitingForReference"


def test_invalid_spec_fails_without_touching_children() -> None:
    cr = _cr(minReplicas=5, maxReplicas=2)
    plan = reconcile_service(cr, _observed(deployment=_deployment(ready=1)), NOW)
    assert plan.status["reason"] == "InvalidSpec" and plan.patch == plan.create == plan.delete == []


def test_merge_diff() -> None:
    assert merge_diff({"a": 1, "b": {"c": 1, "d": 2}, "e": [1]}, {"a": 1, "b": {"c": 2}, "e": [2]}) == {
        "b": {"c": 2, "d": None}, "e": [2]}
    assert yaml.safe_load(yaml.safe_dump(merge_diff({}, {"x": 1}))) == {"x": 1}


# -- hardening (issue #15): hostPath roots, API keys, 403s, the oldest Kubernetes --------------


@pytest.mark.parametrize("node_path", ["/etc", "/", "/root/.ssh", "/var/lib/kubelet", "/mnt/nvme/kubetune-cache"])
def test_a_resource_cannot_name_a_node_directory(node_path: str) -> None:
    """`cache.path` (a node path) is refused by `kubetune validate`/the webhook (admit) and by the
    reconciler (Failed/InvalidSpec, nothing created): no root container ever chowns it."""
    cr = _cr(cache={"type": "hostPath", "path": node_path})
    with pytest.raises(SpecErrors, match=r"cache\.subPath"):
        validate_resource(cr)
    with pytest.raises(Exception, match="not accepted"):
        admit("CREATE", None, cr)
    plan = reconcile_service(cr, _observed(), NOW)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert not plan.create and not plan.patch and plan.api_key_secret is None


@pytest.mark.parametrize("sub_path", ["..", ".", "../../etc", "a/b", "/etc", "x/../..", ".hidden", "a b", ""])
def test_hostpath_sub_directory_is_one_safe_segment(sub_path: str) -> None:
    with pytest.raises(SpecErrors, match="subPath"):
        validate_resource(_cr(cache={"type": "hostPath", "subPath": sub_path}))


def test_hostpath_cache_lives_under_the_operators_root_per_namespace() -> None:
    """The node directory is <operator root>/<namespace>/<subPath>; the root-owned chown runs
    in the operator's image for the engine, not in the resource's own spec.image."""
    options = ServingOptions(host_cache_root="/srv/kubetune-cache")
    pod = _pod(render_inference(_cr(image="tenant/evil:1", cache={"type": "hostPath", "subPath": "llama"}), MODELS, options))
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert volume["hostPath"] == {"path": "/srv/kubetune-cache/ml/llama", "type": "DirectoryOrCreate"}
    permissions = pod["initContainers"][0]
    assert permissions["name"] == "cache-permissions" and permissions["image"] == options.image_for("vllm")
    assert permissions["image"] != "tenant/evil:1" and pod["containers"][0]["image"] == "tenant/evil:1"
    default = _pod(render_inference(_cr(cache={"type": "hostPath"}), MODELS))
    assert next(v for v in default["volumes"] if v["name"] == "model-cache")["hostPath"]["path"] == \
        "/var/lib/kubetune/cache/ml/default"


def test_host_path_is_checked_again_when_rendered() -> None:
    from kubetune.operator.serving.render import host_cache_path

    assert host_cache_path("/var/lib/kubetune/cache", "ml", "llama") == "/var/lib/kubetune/cache/ml/llama"
    for namespace, sub in (("ml", ".."), ("..", "x"), ("ml", "a/../../.."), ("", "x")):
        with pytest.raises(ValueError):
            host_cache_path("/var/lib/kubetune/cache", namespace, sub)


@pytest.mark.parametrize("root", ["/", "/etc", "/var/lib/kubelet", "/var/lib/kubelet/pods", "/root", "/usr", "/var",
                                  "relative", "/a/../etc", "/proc/1"])
def test_operator_refuses_a_system_directory_as_cache_root(root: str) -> None:
    from kubetune.operator.validation import check_host_cache_root

    with pytest.raises(ValueError):
        check_host_cache_root(root)
    assert check_host_cache_root("/var/lib/kubetune/cache") == "/var/lib/kubetune/cache"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_service_gets_a_generated_api_key_by_reference() -> None:
    """No API key used to mean an open admin API (/v1/load_lora_adapter). Now the server and the
    adapters sidecar read KUBETUNE_API_KEY from the service's own Secret; the init container (a
    downloader) does not get it, and the key itself is nowhere in the pod template."""
    from kubetune.operator.serving.render import api_key_secret_name

    pod = _pod(render_inference(_cr(), MODELS))
    containers = {c["name"]: c for c in pod["containers"] + pod["initContainers"]}
    ref = {"secretKeyRef": {"name": "llama-chat-isvc-api-key", "key": "api-key"}}
    assert api_key_secret_name("llama-chat") == "llama-chat-isvc-api-key"
    assert _env(containers["server"])["KUBETUNE_API_KEY"] == {"name": "KUBETUNE_API_KEY", "valueFrom": ref}
    assert _env(containers["adapters"])["KUBETUNE_API_KEY"] == {"name": "KUBETUNE_API_KEY", "valueFrom": ref}
    assert "KUBETUNE_API_KEY" not in _env(containers["fetch"])


def test_own_key_or_explicit_opt_out_generates_nothing() -> None:
    own = [{"name": "KUBETUNE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "team-key", "key": "k"}}}]
    pod = _pod(render_inference(_cr(env=own), MODELS))
    server = _env(pod["containers"][0])
    assert server["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-key", "key": "k"}
    plan = reconcile_service(_cr(env=own), _observed(), NOW)
    assert plan.api_key_secret is None and plan.status["apiKeySecret"] == "team-key"
    opted_out = reconcile_service(_cr(env=[{"name": "KUBETUNE_API_KEY", "value": ""}]), _observed(), NOW)
    assert opted_out.api_key_secret is None and "apiKeySecret" not in opted_out.status


def test_the_key_secret_is_created_first_and_only_its_name_is_in_the_status() -> None:
    plan = reconcile_service(EXAMPLE_ISVC, _observed(), NOW)
    secret = plan.api_key_secret
    assert secret is not None and secret["kind"] == "Secret" and secret["metadata"]["name"] == "llama-chat-isvc-api-key"
    assert "data" not in secret and "stringData" not in secret  # the shell adds the key at create time
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner["uid"] == "isvc-uid" and owner["controller"] is True
    assert plan.status["apiKeySecret"] == "llama-chat-isvc-api-key"
    InferenceServiceStatus.model_validate(plan.status)
    # Steady state (recorded in the status, Deployment there, no spec change): no create call.
    again = reconcile_service({**EXAMPLE_ISVC, "status": plan.status}, _observed(deployment=_deployment(ready=1)), NOW)
    assert again.api_key_secret is None


class _FakeKube:
    """The I/O shell's kube client: records writes, refuses what `forbid` names with 403."""

    def __init__(self, cr: dict[str, Any], children: dict[tuple[str, str], dict[str, Any]],
                 forbid: set[tuple[str, str]] = frozenset()):  # type: ignore[assignment]
        s3 = {("Secret", "s3-creds"): {"metadata": {"name": "s3-creds"}}}  # the spec's storage.secretRef
        self.objects = {("InferenceService", cr["metadata"]["name"]): cr, **s3, **children}
        self.forbid = forbid
        self.writes: list[tuple[str, str, str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def _check(self, verb: str, kind: str, plural: str) -> None:
        from kubetune.operator.kube import KubeError

        if (verb, kind) in self.forbid:
            raise KubeError(403, f"{plural} is forbidden", verb=verb, resource=plural, namespace="ml")

    def get(self, kind: str, namespace: str, name: str, metadata_only: bool = False) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self._check("create", body["kind"], body["kind"].lower() + "s")
        self.writes.append(("create", body["kind"], body["metadata"]["name"], body))
        return body, True

    def create_if_absent(self, body: dict[str, Any]) -> bool:
        self._check("create", body["kind"], "secrets")
        self.writes.append(("create", body["kind"], body["metadata"]["name"], body))
        return True

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> None:
        self._check("patch", kind, kind.lower() + "s")
        self.writes.append(("patch", kind + (f"/{subresource}" if subresource else ""), name, patch))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(("delete", kind, name, None))
        return True

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def _reconcile_service(kube: Any) -> None:
    """The operator's own loop (read, observe, decide, apply, report) for llama-chat in ml."""
    from kubetune.operator.apply import reconcile_resource
    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.serving.component import COMPONENT

    reconcile_resource(kube, COMPONENT, "ml", "llama-chat", OperatorConfig(serving=ServingOptions()))


def test_the_shell_creates_a_random_key_and_never_logs_or_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    kube = _FakeKube(copy.deepcopy(EXAMPLE_ISVC), {("FineTuneJob", "legal-sft"): _job("Succeeded")})
    with caplog.at_level(logging.DEBUG):
        _reconcile_service(kube)
    secrets = [w[3] for w in kube.writes if w[:2] == ("create", "Secret")]
    assert len(secrets) == 1 and kube.writes[0][1] == "Secret"  # before the Deployment that references it
    key = secrets[0]["stringData"]["api-key"]
    assert len(key) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", key)  # secrets.token_urlsafe(32)
    status = next(w[3] for w in kube.writes if w[1] == "InferenceService/status")["status"]
    assert status["apiKeySecret"] == "llama-chat-isvc-api-key"
    for text in (caplog.text, json.dumps(status), json.dumps(kube.events),
                 json.dumps([w for w in kube.writes if w[1] != "Secret"])):
        assert key not in text
    kube2 = _FakeKube(copy.deepcopy(EXAMPLE_ISVC), {("FineTuneJob", "legal-sft"): _job("Succeeded")})
    _reconcile_service(kube2)
    assert next(w[3] for w in kube2.writes if w[1] == "Secret")["stringData"]["api-key"] != key


def test_a_forbidden_call_is_reported_and_does_not_block_the_other_changes() -> None:
    """The chart once lacked `patch` on ConfigMaps: adding an adapter failed with a 403 the user
    never saw, and the exception stopped every other change. Now the other changes go through
    and the service says which permission is missing (Ready=False/Forbidden + a Warning event)."""
    objs = _by_kind(render_inference(EXAMPLE_ISVC, MODELS))
    deployed = _deployment(ready=1)
    children = {("Deployment", "llama-chat-isvc"): deployed, ("Service", "llama-chat-isvc"): objs["Service"],
                ("HorizontalPodAutoscaler", "llama-chat-isvc"): objs["HorizontalPodAutoscaler"],
                ("ConfigMap", "llama-chat-isvc-adapters"): objs["ConfigMap"],
                ("FineTuneJob", "legal-sft"): _job("Succeeded")}
    cr = _cr(adapters=[{"name": "support", "uri": "s3://outputs/support-lora"},
                       {"name": "sales", "uri": "s3://outputs/sales-lora"}],
             engineArgs={"maxModelLen": 4096, "dtype": "bfloat16", "quantization": "fp8"})
    kube = _FakeKube(cr, children, forbid={("patch", "ConfigMap")})
    _reconcile_service(kube)
    assert any(w[:3] == ("patch", "Deployment", "llama-chat-isvc") for w in kube.writes)  # the roll still happens
    status = next(w[3] for w in kube.writes if w[1] == "InferenceService/status")["status"]
    ready = _cond(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Forbidden"
    assert "patch configmaps in namespace ml" in ready["message"]
    assert [(t, r) for t, r, _ in kube.events if r == "Forbidden"] == [("Warning", "Forbidden")]
    # The next pass, still refused: the same condition, no second event.
    cr["status"] = status
    kube.events.clear()
    kube.writes.clear()
    _reconcile_service(kube)
    assert not [e for e in kube.events if e[1] == "Forbidden"]


def test_children_validate_against_the_oldest_kubernetes_the_chart_claims() -> None:
    """The Deployment uses `lifecycle.preStop.sleep` (Kubernetes >= 1.30): the chart must not
    claim an older cluster. Every child is validated against the chart's minimum version."""
    chart = yaml.safe_load((Path(__file__).resolve().parents[1] / "charts/kubetune/Chart.yaml").read_text())
    major, minor = re.match(r">=\s*(\d+)\.(\d+)", chart["kubeVersion"]).groups()
    oldest = f"{major}.{minor}"
    for spec in ({}, {"cache": {"type": "hostPath"}, "engine": "transformers", "engineArgs": {}}):
        for obj in render_inference(_cr(**spec), MODELS):
            assert kubernetes_validate.validate(obj, oldest, strict=True), obj["kind"]
    secret = reconcile_service(EXAMPLE_ISVC, _observed(), NOW).api_key_secret
    assert kubernetes_validate.validate({**secret, "stringData": {"api-key": "x"}}, oldest, strict=True)


def test_two_or_more_replicas_get_a_disruption_budget_and_spread_over_nodes() -> None:
    """#20 item 6: from two replicas a PodDisruptionBudget lets drains and upgrades evict one
    replica at a time (never below two: a budget on one replica blocks every drain), and the
    replicas spread over nodes where the scheduler can (soft), whatever their number."""
    one = _by_kind(render_inference(_cr(minReplicas=1, maxReplicas=1), MODELS))
    assert "PodDisruptionBudget" not in one
    two = _by_kind(render_inference(_cr(minReplicas=2, maxReplicas=4), MODELS))
    # scaling never changes the pod template (it would roll the pods)
    assert one["Deployment"]["spec"]["template"] == two["Deployment"]["spec"]["template"]
    pdb = two["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == two["Deployment"]["spec"]["selector"]["matchLabels"]
    (spread,) = two["Deployment"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["topologyKey"] == "kubernetes.io/hostname"
    assert kubernetes_validate.validate(pdb, "1.30", strict=True)
    # The decision creates it with the service and deletes it when minReplicas drops below two.
    cr = _cr(minReplicas=2, maxReplicas=4)
    plan = reconcile_service(cr, _observed(), NOW)
    assert "PodDisruptionBudget" in [o["kind"] for o in plan.create]
    lower = reconcile_service(_cr(minReplicas=1, maxReplicas=4), _observed(deployment=_deployment(ready=2), pdb=pdb), NOW)
    assert ("PodDisruptionBudget", "llama-chat-isvc") in lower.delete
    steady = reconcile_service(cr, _observed(deployment=_deployment(ready=2, cr=cr), pdb=pdb), NOW)
    assert not [o for o in steady.create if o["kind"] == "PodDisruptionBudget"] and not steady.delete
