"""Pod template overrides, platform defaults and scale to zero (issue 20 items 4 and 6), without a
cluster: the merge, the conflicts admission refuses, the pods rendered (checked against the
Kubernetes 1.37 schema), `kubetune render --values`, and the KEDA ScaledObject decisions."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.operator.config import OperatorConfig, load_platform_defaults
from kubetune.operator.overrides import PlatformDefaults, apply_pod_template, merge_templates
from kubetune.operator.preview import render_manifest
from kubetune.operator.resources import PodTemplate, validate_spec
from kubetune.operator.serving.decide import ServingObserved, reconcile_service
from kubetune.operator.serving.render import ServingOptions, render_inference, render_scaled_object
from kubetune.operator.training.render import RenderOptions, render_job, render_prepare_job
from kubetune.operator.validation import admit, validate_resource
from kubetune.trainer.api.errors import SpecErrors
from kubetune.trainer.cli.main import main

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = kubernetes_validate.latest_version()
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

OVERRIDE: dict[str, Any] = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
    "spec": {
        "imagePullSecrets": [{"name": "registry"}],
        "schedulerName": "gpu-scheduler",
        "runtimeClassName": "nvidia",
        "hostNetwork": True,
        "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "team-fs"}}],
        "initContainers": [{"name": "warm-cache", "image": "busybox:1.37", "command": ["true"]}],
        "containers": [{"name": "log-shipper", "image": "fluent/fluent-bit:3", "resources": {"requests": {"cpu": "50m"}},
                        "volumeMounts": [{"name": "shared", "mountPath": "/logs", "readOnly": True}]}],
    },
    "container": {
        "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
        "envFrom": [{"configMapRef": {"name": "nccl-tuning"}}],
        "volumeMounts": [{"name": "shared", "mountPath": "/mnt/shared"}],
        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
    },
}


def finetunejob(pod_template: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"training": {"model": {"path": "s3://models/llama"}, "data": {"datasets": [{"path": "s3://d/chat.jsonl"}]},
                         "output": {"path": "s3://out/run"}}, **spec}
    if pod_template is not None:
        body["podTemplate"] = pod_template
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u1"}, "spec": body}


def inferenceservice(pod_template: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"model": {"uri": "s3://models/llama"}, "engine": "transformers", **spec}
    if pod_template is not None:
        body["podTemplate"] = pod_template
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u2", "generation": 1}, "spec": body}


def refusal(cr: dict[str, Any]) -> str:
    with pytest.raises(SpecErrors) as info:
        validate_resource(cr)
    return str(info.value)


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


# -- the override on the rendered pods -----------------------------------------------------------


def test_override_reaches_the_training_pod_and_kubetune_keeps_its_own_fields() -> None:
    cr = finetunejob(OVERRIDE)
    spec = validate_resource(cr)
    job = render_job(cr, spec, attempt=1)
    pod = pod_of(job)
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["labels"]["kubetune.io/name"] == "demo"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    body = pod["spec"]
    assert body["imagePullSecrets"] == [{"name": "registry"}]
    assert (body["schedulerName"], body["runtimeClassName"], body["hostNetwork"]) == ("gpu-scheduler", "nvidia", True)
    assert body["dnsPolicy"] == "ClusterFirstWithHostNet"  # pod 0's Service name still resolves
    assert [c["name"] for c in body["initContainers"]] == ["warm-cache"]
    assert [c["name"] for c in body["containers"]] == ["trainer", "log-shipper"]
    trainer = container(pod, "trainer")
    assert {"name": "shared", "mountPath": "/mnt/shared"} in trainer["volumeMounts"]
    assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in trainer["env"]
    assert trainer["envFrom"] == [{"configMapRef": {"name": "nccl-tuning"}}]
    assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert trainer["securityContext"]["runAsNonRoot"] is True and body["securityContext"]["runAsNonRoot"] is True
    # Extra containers start from the restricted context: non-root, nothing added.
    shipper = container(pod, "log-shipper")
    assert shipper["securityContext"] == {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                          "capabilities": {"drop": ["ALL"]}}
    assert shipper["resources"] == {"requests": {"cpu": "50m"}}
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    prepare = render_prepare_job(cr, spec)
    assert {"name": "shared", "mountPath": "/mnt/shared"} in container(pod_of(prepare), "prepare")["volumeMounts"]
    assert kubernetes_validate.validate(prepare, K8S_VERSION, strict=True)


def test_override_reaches_the_server_pod() -> None:
    override = copy.deepcopy(OVERRIDE)
    override["spec"].pop("hostNetwork")
    objects = render_inference(inferenceservice(override))
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = pod_of(deployment)
    server = container(pod, "server")
    assert {"name": "shared", "mountPath": "/mnt/shared"} in server["volumeMounts"]
    assert not any(m["mountPath"] == "/mnt/shared" for m in container(pod, "adapters")["volumeMounts"])
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["warm-cache", "fetch"]  # the platform's first
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_without_a_pod_template_nothing_changes() -> None:
    cr = finetunejob()
    spec = validate_spec("FineTuneJob", cr["spec"])
    template = pod_of(render_job(cr, spec, attempt=1))
    again, conflicts = apply_pod_template(template, PodTemplate(), "trainer")
    assert again == template and conflicts == []


# -- conflicts: kubetune's fields win, admission says so -----------------------------------------


@pytest.mark.parametrize(("override", "field", "words"), [
    ({"container": {"volumeMounts": [{"name": "x", "mountPath": "/workspace"}]}, "spec": {"volumes": [
        {"name": "x", "emptyDir": {}}]}}, "spec.podTemplate.container.volumeMounts[0].mountPath", "kubetune mounts"),
    ({"container": {"env": [{"name": "KUBETUNE_NNODES", "value": "4"}]}}, "spec.podTemplate.container.env[0].name",
     "set by kubetune"),
    ({"spec": {"containers": [{"name": "trainer", "image": "x"}]}}, "spec.podTemplate.spec.containers[0].name",
     "kubetune's containers"),
    ({"spec": {"initContainers": [{"name": "prepare", "image": "x"}]}}, "spec.podTemplate.spec.initContainers[0].name",
     "kubetune's containers"),
    ({"spec": {"volumes": [{"name": "cache", "emptyDir": {}}]}}, "spec.podTemplate.spec.volumes[0].name",
     "one of kubetune's"),
    ({"metadata": {"labels": {"kubetune.io/name": "other"}}}, "spec.podTemplate.metadata.labels[kubetune.io/name]",
     "set by kubetune"),
    ({"container": {"volumeMounts": [{"name": "missing", "mountPath": "/mnt/x"}]}},
     "spec.podTemplate.container.volumeMounts[0].name", "names no volume"),
])
def test_a_conflict_is_refused_naming_the_field(override: dict[str, Any], field: str, words: str) -> None:
    message = refusal(finetunejob(override))
    assert field in message and words in message and "Fix:" in message, message


def test_an_env_var_in_spec_env_and_the_template_is_refused() -> None:
    cr = finetunejob({"container": {"env": [{"name": "WANDB_PROJECT", "value": "a"}]}},
                     env=[{"name": "WANDB_PROJECT", "value": "b"}])
    assert "also in spec.env" in refusal(cr)


def test_server_conflicts_are_checked_against_the_server_pod() -> None:
    message = refusal(inferenceservice({"container": {"volumeMounts": [{"name": "model-cache",
                                                                         "mountPath": "/var/cache/kubetune"}]},
                                        "spec": {"containers": [{"name": "fetch", "image": "x"}]}}))
    assert "container.volumeMounts[0].mountPath" in message and "spec.containers[0].name" in message


@pytest.mark.parametrize(("override", "words"), [
    ({"spec": {"volumes": [{"name": "data", "emptyDir": {}, "hostPath": {"path": "/x"}}]}}, "exactly one source"),
    ({"spec": {"volumes": [{"name": "data", "bogus": {}}]}}, "not a core/v1 volume source"),
    ({"spec": {"volumes": [{"name": "Data", "emptyDir": {}}]}}, "DNS label"),
    ({"container": {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}}, "IPC_LOCK"),
    ({"container": {"securityContext": {"runAsUser": 0}}}, "greater than or equal to 1"),
    ({"spec": {"containers": [{"name": "x", "image": "y", "privileged": True}]}}, "privileged"),
])
def test_the_schema_refuses_what_kubernetes_would(override: dict[str, Any], words: str) -> None:
    assert words in refusal(finetunejob(override))


def test_capabilities_and_host_network_warn_about_pod_security() -> None:
    warnings = admit("CREATE", None, finetunejob(OVERRIDE))
    (warning,) = [w for w in warnings if "Pod Security" in w]
    assert "hostNetwork" in warning and "IPC_LOCK" in warning and "privileged" in warning
    assert not [w for w in admit("CREATE", None, finetunejob({"spec": {"schedulerName": "x"}})) if "Pod Security" in w]


# -- platform defaults ---------------------------------------------------------------------------

DEFAULTS = {
    "nodeSelector": {"pool": "gpu", "zone": "a"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "podTemplate": {
        "metadata": {"labels": {"team": "platform", "cost-center": "ml"}},
        "spec": {"imagePullSecrets": [{"name": "registry"}],
                 "volumes": [{"name": "shared", "nfs": {"server": "fs.local", "path": "/ml"}}]},
        "container": {"volumeMounts": [{"name": "shared", "mountPath": "/mnt/shared"}],
                      "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]},
    },
}


def test_platform_defaults_sit_under_the_resources_own_template() -> None:
    defaults = PlatformDefaults.model_validate(DEFAULTS)
    own = PodTemplate.model_validate({
        "metadata": {"labels": {"team": "nlp"}},
        "spec": {"volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "mine"}}]},
        "container": {"env": [{"name": "NCCL_IB_HCA", "value": "mlx5_1"}]},
    })
    merged = merge_templates(defaults.podTemplate, own)
    assert merged.metadata.labels == {"team": "nlp", "cost-center": "ml"}
    assert [v for v in merged.spec.volumes if v["name"] == "shared"] == [
        {"name": "shared", "persistentVolumeClaim": {"claimName": "mine"}}]
    assert [e.value for e in merged.container.env] == ["mlx5_1"]
    assert [m.mountPath for m in merged.container.volumeMounts] == ["/mnt/shared"]


def test_the_operator_renders_with_its_platform_defaults_and_the_resource_wins() -> None:
    colliding = copy.deepcopy(DEFAULTS)
    colliding["podTemplate"]["spec"]["volumes"].append({"name": "cache", "emptyDir": {}})
    defaults = PlatformDefaults.model_validate(colliding)  # as if it had passed the start-up check
    cr = finetunejob({"metadata": {"labels": {"team": "nlp"}}}, nodeSelector={"zone": "b"})
    job = render_job(cr, validate_resource(cr), attempt=1, options=RenderOptions(platform_defaults=defaults))
    pod = pod_of(job)
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["labels"]["cost-center"] == "ml"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    assert pod["spec"]["tolerations"] == DEFAULTS["tolerations"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    trainer = container(pod, "trainer")
    assert {"name": "shared", "mountPath": "/mnt/shared"} in trainer["volumeMounts"]
    # The default's `cache` volume collides with kubetune's own: kubetune's stays, the default goes.
    caches = [v for v in pod["spec"]["volumes"] if v["name"] == "cache"]
    assert caches == [{"name": "cache", "emptyDir": {}}] and len(pod["spec"]["volumes"]) == 6
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_platform_defaults_from_the_chart_values(tmp_path: Path) -> None:
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    assert values["platformDefaults"] == {}
    assert load_platform_defaults(values=str(REPO / "charts" / "kubetune" / "values.yaml")) is None
    values["platformDefaults"] = DEFAULTS
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert load_platform_defaults(values=str(path)) == PlatformDefaults.model_validate(DEFAULTS)
    values["platformDefaults"] = {"podTemplate": {"container": {"env": [{"name": "HF_HOME", "value": "/x"}]},
                                                  "spec": {"containers": [{"name": "server", "image": "x"}]}}}
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(SpecErrors) as info:  # defaults kubetune's own fields would override: refused at start
        load_platform_defaults(values=str(path))
    message = str(info.value)
    assert "platformDefaults.podTemplate.container.env[0].name" in message and "HF_HOME" in message
    assert "platformDefaults.podTemplate.spec.containers[0].name" in message, message
    values["platformDefaults"] = {"podTemplate": {"spec": {"volumes": [{"name": "x"}]}}}
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(SpecErrors) as info:
        load_platform_defaults(values=str(path))
    assert "platformDefaults.podTemplate.spec.volumes[0]" in str(info.value) and info.value.exit_code == 2


def test_render_cli_shows_the_charts_platform_defaults(tmp_path: Path, capsys: Any) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"platformDefaults": DEFAULTS}))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(finetunejob()))
    assert main(["render", str(manifest), "--values", str(values)]) == 0
    job = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o["kind"] == "Job"][-1]
    assert pod_of(job)["spec"]["nodeSelector"]["pool"] == "gpu"
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(yaml.safe_dump({"podTemplate": {"spec": {"hostNetwork": "sometimes"}}}))
    assert main(["render", str(manifest), "--platform-defaults", str(defaults)]) == 2
    assert "podTemplate.spec.hostNetwork" in capsys.readouterr().err


# -- scale to zero (KEDA) ------------------------------------------------------------------------


def test_min_replicas_zero_renders_a_scaled_object_instead_of_an_hpa() -> None:
    cr = inferenceservice(minReplicas=0, maxReplicas=3, autoscaling={"metric": "queueDepth", "target": 2})
    objects = render_inference(cr, options=ServingOptions(prometheus_address="http://prom.monitoring:9090"))
    kinds = [o["kind"] for o in objects]
    assert "HorizontalPodAutoscaler" not in kinds and "PodDisruptionBudget" not in kinds
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-isvc"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 3)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"] == {"serverAddress": "http://prom.monitoring:9090", "threshold": "2",
                                   "activationThreshold": "0",
                                   "query": 'sum(kubetune_queue_depth{namespace="ml",pod=~"chat-isvc-[a-z0-9]+-[a-z0-9]+"})'}
    assert next(o for o in objects if o["kind"] == "Deployment")["spec"]["replicas"] == 0


def test_vllm_scales_on_vllms_gauges_and_an_activation_query_is_a_second_trigger() -> None:
    cr = inferenceservice(engine="vllm", minReplicas=0, maxReplicas=2,
                          autoscaling={"activationQuery": "sum(rate(istio_requests_total{destination_service_name=\"chat-isvc\"}[1m]))"})
    spec = validate_resource(cr)
    scaled = render_scaled_object(cr, spec)
    load, demand = scaled["spec"]["triggers"]
    assert load["metadata"]["query"].startswith("sum(vllm:num_requests_running{") and "vllm:num_requests_waiting" in load["metadata"]["query"]
    assert demand["metadata"]["query"].startswith("sum(rate(istio_requests_total")
    assert render_scaled_object(inferenceservice(), validate_resource(inferenceservice())) is None


@pytest.mark.parametrize(("spec", "words"), [
    ({"minReplicas": 0}, "needs maxReplicas"),
    ({"minReplicas": 0, "maxReplicas": 2, "autoscaling": {"metric": "cpu"}, "resources": {"requests": {"cpu": 1}}},
     "cannot scale on cpu"),
    ({"minReplicas": 1, "maxReplicas": 2, "autoscaling": {"activationQuery": "up"}}, "is for minReplicas 0"),
])
def test_scale_to_zero_rules(spec: dict[str, Any], words: str) -> None:
    assert words in refusal(inferenceservice(**spec))


def _plan(cr: dict[str, Any], **observed: Any) -> Any:
    return reconcile_service(cr, ServingObserved(secret_found=None, **observed), now=NOW)


def test_without_keda_scale_to_zero_is_refused_with_a_status() -> None:
    plan = _plan(inferenceservice(minReplicas=0, maxReplicas=2), keda=False)
    assert plan.create == [] and plan.status["phase"] == "Failed" and plan.status["reason"] == "KedaNotInstalled"
    assert "scaledobjects.keda.sh" in plan.status["message"] and "minReplicas to 1" in plan.status["message"]


def test_with_keda_the_scaled_object_is_created_patched_and_deleted() -> None:
    cr = inferenceservice(minReplicas=0, maxReplicas=2)
    plan = _plan(cr, keda=True)
    scaled = next(o for o in plan.create if o["kind"] == "ScaledObject")
    assert not [o for o in plan.create if o["kind"] == "HorizontalPodAutoscaler"]
    deployment = next(o for o in plan.create if o["kind"] == "Deployment")
    deployment["status"] = {"replicas": 0, "observedGeneration": 1}
    deployment["metadata"]["generation"] = 1
    cr["status"] = plan.status
    settled = _plan(cr, keda=True, deployment=deployment, scaled_object=scaled,
                    adapters_config=next(o for o in plan.create if o["kind"] == "ConfigMap"),
                    service=next(o for o in plan.create if o["kind"] == "Service"))
    assert settled.create == [] and settled.patch == []
    assert (settled.status["phase"], settled.status["reason"]) == ("Ready", "ScaledToZero")
    bigger = copy.deepcopy(cr)
    bigger["spec"]["maxReplicas"] = 4
    patched = _plan(bigger, keda=True, deployment=deployment, scaled_object=scaled)
    assert [p[0] for p in patched.patch if p[0] == "ScaledObject"] == ["ScaledObject"]
    assert next(p for p in patched.patch if p[0] == "ScaledObject")[2]["spec"] == {"maxReplicaCount": 4}
    back = copy.deepcopy(cr)
    back["spec"].update(minReplicas=1, maxReplicas=2)
    off = _plan(back, deployment=deployment, scaled_object=scaled)
    assert ("ScaledObject", "chat-isvc") in off.delete
    # an HPA never scales a Deployment at zero: back from zero, the operator sets minReplicas
    assert ("Deployment", "chat-isvc") in [(k, n) for k, n, p in off.patch if p.get("spec", {}).get("replicas") == 1]
    assert [o["kind"] for o in off.create if o["kind"] == "HorizontalPodAutoscaler"] == ["HorizontalPodAutoscaler"]


def test_render_preview_shows_the_scaled_object() -> None:
    objects = render_manifest(inferenceservice(minReplicas=0, maxReplicas=2), OperatorConfig())
    assert "ScaledObject" in [o["kind"] for o in objects]


def test_the_crds_embed_kubernetes_own_volume_schema() -> None:
    """operator/core-v1-volume.json is Kubernetes 1.37's core/v1 Volume schema, regenerated here
    from kubernetes-validate (stale: `python -m tests.k8s_schemas`), and every CRD's
    podTemplate.spec.volumes items are it."""
    from kubetune.operator.crdgen import crd
    from tests import k8s_schemas

    assert k8s_schemas.VOLUME_SCHEMA.read_text() == k8s_schemas.text(), "run python -m tests.k8s_schemas"
    expected = k8s_schemas.volume_schema()
    for kind in ("FineTuneJob", "AlignmentJob", "InferenceService"):
        spec = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        items = spec["properties"]["podTemplate"]["properties"]["spec"]["properties"]["volumes"]["items"]
        assert items == expected
    claim = expected["properties"]["persistentVolumeClaim"]
    assert claim["required"] == ["claimName"] and expected["required"] == ["name"]
    assert expected["properties"]["emptyDir"]["properties"]["sizeLimit"] == {"x-kubernetes-int-or-string": True}

