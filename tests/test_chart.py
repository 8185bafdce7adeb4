"""The Helm chart (charts/kubetune), installed with the real Helm engine.

Helm comes from `helm-sdkpy` (Helm's Go library with Python bindings). It has no `template`
action, so the chart is *installed* — `helm install` with client-side apply — into kmock's
Kubernetes emulator: Helm checks the cluster version, validates the values against
values.schema.json, installs the CRDs from crds/, renders, maps every kind through discovery,
creates the objects and runs the hooks. The test then reads back exactly what Helm applied.
Helm's Go runtime reads HELM_DRIVER (release storage) only from the environment it started
with, and kmock cannot store Helm's protobuf-encoded release Secret, so each install runs in a
subprocess (this file's `__main__`) with HELM_DRIVER=memory.

The RBAC is compared with what the operator really calls in tests/test_operator_real.py (the real
API server's audit log of the operator's ServiceAccount); here, statically, that every resource a
handler watches is granted and that the namespaced Roles have the cluster rules.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.crdgen import crd_files

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE_NAMESPACE = "kubetune"

pytestmark = pytest.mark.slow  # the real Helm engine, each install in a subprocess

# Kinds kubernetes-validate has no schema for (custom resources of other projects); each is
# checked by hand below instead.
NO_K8S_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
    ("kopf.dev/v1", "KopfPeering"),
}

# What the emulator serves (Helm maps every kind through discovery before it applies anything).
EMULATED = {
    "v1/namespaces": ("Namespace", False),
    "v1/secrets": ("Secret", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/services": ("Service", True),
    "v1/serviceaccounts": ("ServiceAccount", True),
    "apps/v1/deployments": ("Deployment", True),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "admissionregistration.k8s.io/v1/validatingwebhookconfigurations": ("ValidatingWebhookConfiguration", False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False),
    "cert-manager.io/v1/issuers": ("Issuer", True),
    "cert-manager.io/v1/certificates": ("Certificate", True),
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True),
}


# --------------------------------------------------------------------------------------------
# helm install into the emulator (runs in a subprocess: see the module docstring)


def _emulator_class() -> Any:
    import kmock

    class HelmCluster(kmock.KubernetesEmulator):
        async def _serve_server_version(self, request: Any) -> Any:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}

        async def _serve_version(self, request: Any) -> Any:
            # kmock 0.8 answers groupVersion "/v1" for the core group; client-go wants "v1".
            out = await super()._serve_version(request)
            if isinstance(out, dict) and str(out.get("groupVersion", "")).startswith("/"):
                out["groupVersion"] = out["groupVersion"][1:]
            return out

    return HelmCluster


async def _install(values: dict[str, Any] | None, workdir: Path, upgrade: bool = False) -> dict[str, Any]:
    import helm_sdkpy
    import kmock
    from kmock._internal import apps

    async with _emulator_class()() as cluster, apps.Server(cluster):
        for key, (kind, namespaced) in EMULATED.items():
            cluster.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "create", "update", "patch", "delete"}
            )
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: emu, cluster: {{server: '{cluster.url}'}}}}]\n"
            f"contexts: [{{name: emu, context: {{cluster: emu, user: emu, namespace: {RELEASE_NAMESPACE}}}}}]\n"
            "current-context: emu\nusers: [{name: emu, user: {token: emu}}]\n"
        )
        config = helm_sdkpy.Configuration(namespace=RELEASE_NAMESPACE, kubeconfig=str(kubeconfig))
        try:
            release = await helm_sdkpy.Install(config).run("kubetune", str(CHART), values=values, wait=False, timeout=60)
            before = [copy.deepcopy(obj.raw) for obj in cluster.objects.values() if not obj.deleted]
            if upgrade:  # `helm upgrade` with the same values, on top of the install
                release = await helm_sdkpy.Upgrade(config).run("kubetune", str(CHART), values=values, wait=False,
                                                                timeout=60)
        except helm_sdkpy.HelmError as exc:
            return {"error": str(exc)}
        objects = [copy.deepcopy(obj.raw) for obj in cluster.objects.values() if not obj.deleted]
    return {"objects": objects, "manifest": release.get("manifest", ""), "notes": (release.get("info") or {}).get("notes", ""),
            "installed": before}


def helm_install(values: dict[str, Any] | None, tmp_path: Path, upgrade: bool = False) -> dict[str, Any]:
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    env = {**os.environ, "HELM_DRIVER": "memory"}
    proc = subprocess.run(
        [sys.executable, __file__, str(values_file), str(tmp_path), *(["upgrade"] if upgrade else [])],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def installed(values: dict[str, Any] | None, tmp_path: Path) -> dict[str, Any]:
    result = helm_install(values, tmp_path)
    assert "error" not in result, result.get("error")
    return result


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text())


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


# --------------------------------------------------------------------------------------------
# fixtures

helm_sdkpy = pytest.importorskip("helm_sdkpy", reason="pip install --ignore-requires-python helm-sdkpy cffi")


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return installed(None, tmp_path_factory.mktemp("defaults"))


@pytest.fixture(scope="module")
def peered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return installed({"replicaCount": 2}, tmp_path_factory.mktemp("peered"))


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {path.name: installed(ci_values(path.name), tmp_path_factory.mktemp(path.stem)) for path in CI_VALUES}


# --------------------------------------------------------------------------------------------
# lint


def _lint(chart: Path) -> dict[str, Any]:
    return asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(chart)))


def _lint_errors(result: dict[str, Any]) -> list[Any]:
    messages = result.get("messages") or []
    return [m for m in messages if str(m.get("severity", "")).lower() in ("error", "3")] if isinstance(messages, list) else []


def test_chart_lints_with_defaults() -> None:
    result = _lint(CHART)
    assert result.get("passed", not _lint_errors(result)), result
    assert not _lint_errors(result), result


@pytest.mark.parametrize("values_file", [p.name for p in CI_VALUES])
def test_chart_lints_with_ci_values(values_file: str, tmp_path: Path) -> None:
    # helm-sdkpy's Lint takes no values: lint a copy whose values.yaml has the ci values merged in.
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART, chart)
    merged = _merge(yaml.safe_load((CHART / "values.yaml").read_text()), ci_values(values_file))
    (chart / "values.yaml").write_text(yaml.safe_dump(merged))
    result = _lint(chart)
    assert not _lint_errors(result), result


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------------------------
# rendered objects


def _validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    if (obj["apiVersion"], obj["kind"]) in NO_K8S_SCHEMA:
        return
    kubernetes_validate.validate(obj, "1.33", strict=True)


def test_defaults_render_a_standalone_cluster_wide_operator(defaults: dict[str, Any]) -> None:
    objects = defaults["objects"]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * (len(crd_files()) + 2) + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]
    ), kinds
    assert not by_kind(objects, "ClusterKopfPeering")
    for obj in objects:
        _validate(obj)
    deploy = one(objects, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert container["args"][:3] == ["operator", "--all-namespaces", "--standalone"]
    assert "--trainer-image=ghcr.io/kubetune/kubetune-trainer:0.1.0" in container["args"]
    # Hardened: non-root, read-only root fs, seccomp RuntimeDefault, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # Probes on kopf's health endpoint, the one --liveness serves.
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    assert liveness == "--liveness=http://0.0.0.0:8080/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert "kubetune-operator:0.1.0" in container["image"]
    assert "rollout status deployment/kubetune" in defaults["notes"]


def test_chart_crds_are_the_generated_ones_in_one_copy() -> None:
    """One copy of each CRD (#18): the chart's `crds/` is a link to the top-level `crds/`, which holds the files
    `kubetune crds` generates plus kopf's peering CRDs, byte for byte what the generator writes."""
    assert (CHART / "crds").is_symlink() and (CHART / "crds").resolve() == (ROOT / "crds").resolve()
    generated = crd_files()
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == sorted([*generated, "kopf-peerings.yaml"])
    for name, text in generated.items():
        assert (CHART / "crds" / name).read_text() == text, f"charts/kubetune/crds/{name} is stale: kubetune crds --out crds"


def test_installed_crds_are_the_generated_ones(defaults: dict[str, Any]) -> None:
    crds = {c["metadata"]["name"]: c for c in by_kind(defaults["objects"], "CustomResourceDefinition")}
    for text in crd_files().values():
        generated = yaml.safe_load(text)
        assert crds[generated["metadata"]["name"]]["spec"] == generated["spec"]


def test_namespaced_values_render(renders: dict[str, dict[str, Any]]) -> None:
    objects = renders["namespaced-values.yaml"]["objects"]
    for obj in objects:
        _validate(obj)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"] for r in by_kind(objects, "Role")}
    bindings = {(b["metadata"]["namespace"], b["subjects"][0]["namespace"]) for b in by_kind(objects, "RoleBinding")}
    assert roles == {"team-a", "team-b"}
    assert bindings == {("team-a", RELEASE_NAMESPACE), ("team-b", RELEASE_NAMESPACE)}

    deploy = one(objects, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert deploy["spec"]["replicas"] == 2 and "strategy" not in deploy["spec"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--peering=kubetune" in args and "--standalone" not in args
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "kubetune-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["KUBETUNE_KOPF_SCANNING"]["value"] == "0"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/kubetune-operator")

    # Namespaced peering: one KopfPeering per watched namespace.
    assert not by_kind(objects, "ClusterKopfPeering")
    peerings = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in by_kind(objects, "KopfPeering")}
    assert peerings == {("team-a", "kubetune"), ("team-b", "kubetune")}

    # The webhook: Service -> the operator's webhook port, cert-manager certificate, CA injected.
    webhook = one(objects, "ValidatingWebhookConfiguration")
    assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{RELEASE_NAMESPACE}/kubetune-webhook"
    hook = webhook["webhooks"][0]
    assert hook["clientConfig"]["service"] == {"name": "kubetune-webhook", "namespace": RELEASE_NAMESPACE, "path": "/validate-spec", "port": 443}
    assert hook["rules"][0]["resources"] == ["finetunejobs", "alignmentjobs", "inferenceservices"]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    cert = one(objects, "Certificate")
    assert cert["spec"]["dnsNames"][0] == f"kubetune-webhook.{RELEASE_NAMESPACE}.svc"
    assert f"--webhook-host=kubetune-webhook.{RELEASE_NAMESPACE}.svc" in args
    assert one(objects, "Issuer")["spec"] == {"selfSigned": {}}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhook-tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    assert services["kubetune-webhook"]["spec"]["ports"][0]["targetPort"] == "webhook"
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert services["kubetune-metrics"]["spec"]["ports"][0]["targetPort"] == "metrics"


def test_cluster_values_render(renders: dict[str, dict[str, Any]]) -> None:
    objects = renders["cluster-values.yaml"]["objects"]
    for obj in objects:
        _validate(obj)
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and "--peering=kubetune-peering" in args
    assert [p["metadata"]["name"] for p in by_kind(objects, "ClusterKopfPeering")] == ["kubetune-peering"]
    crd = next(c for c in by_kind(objects, "CustomResourceDefinition") if c["metadata"]["name"] == "clusterkopfpeerings.kopf.dev")
    assert crd["spec"]["scope"] == "Cluster"
    hook = one(objects, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).startswith(b"-----BEGIN CERTIFICATE")
    assert not by_kind(objects, "Certificate") and not by_kind(objects, "Issuer")
    rules = one(objects, "ClusterRole")["rules"]
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["list", "watch", "patch"]} in rules


def test_webhook_path_is_the_operators_handler_id() -> None:
    # kopf serves an admission handler at /<handler id>: the registry built with a webhook has it.
    import kopf

    from kubetune.operator.config import OperatorConfig, WebhookConfig
    from kubetune.operator.handlers import register

    with_webhook = register(kopf.OperatorRegistry(), OperatorConfig(webhook=WebhookConfig(port=9443)))
    ids = {h.id for h in with_webhook._webhooks.get_all_handlers()}
    assert ids == {"validate-spec"}, ids
    assert not register(kopf.OperatorRegistry(), OperatorConfig())._webhooks.get_all_handlers()
    assert "path: /validate-spec" in (CHART / "templates" / "webhook.yaml").read_text()


# --------------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"webhook": {"enabled": "yes"}}, "enabled"),
        ({"rbac": {"scope": "everywhere"}}, "scope"),
        ({"watchNamespaces": "team-a"}, "watchNamespaces"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"jobs": {"s3": {"existingSecret": "Not A Secret"}}}, "existingSecret"),
        ({"jobs": {"s3": {"endpoint": "minio:9000"}}}, "endpoint"),
        ({"serving": {"hostPathCacheRoot": "/etc"}}, "hostPathCacheRoot"),
        ({"serving": {"hostPathCacheRoot": "/var/lib/kubelet/pods"}}, "hostPathCacheRoot"),
        ({"serving": {"hostPathCacheRoot": "/var/lib/../../etc"}}, "hostPathCacheRoot"),
        ({"serving": {"hostPathCacheRoot": "cache"}}, "hostPathCacheRoot"),
        ({"console": {"enabled": "yes"}}, "enabled"),
        ({"console": {"impersonation": {"userHeader": "X User: admin"}}}, "userHeader"),
        ({"console": {"service": {"type": "Ingress"}}}, "type"),
    ],
)
def test_schema_refuses_wrong_values(values: dict[str, Any], field: str, tmp_path: Path) -> None:
    result = helm_install(values, tmp_path)
    assert "error" in result, "helm installed a chart with invalid values"
    assert "schema" in result["error"].lower() and field in result["error"], result["error"]


def test_schema_is_a_valid_json_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    for path in CI_VALUES:
        jsonschema.validate(_merge(yaml.safe_load((CHART / "values.yaml").read_text()), ci_values(path.name)), schema)


def test_namespaced_rbac_needs_namespaces(tmp_path: Path) -> None:
    result = helm_install({"rbac": {"scope": "namespaced"}}, tmp_path)
    assert "needs watchNamespaces" in result.get("error", ""), result


# --------------------------------------------------------------------------------------------
# the operator accepts what the chart passes it

def _operator_args(objects: list[dict[str, Any]]) -> list[str]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def _parse(args: list[str]) -> Any:
    from kubetune.trainer.cli.main import build_parser

    return build_parser().parse_args(args)


def test_operator_parses_the_chart_args(defaults: dict[str, Any], renders: dict[str, dict[str, Any]]) -> None:
    from kubetune.operator.config import config_from_args

    for result in (defaults, *renders.values()):
        parsed = _parse(_operator_args(result["objects"]))
        assert parsed.func.__name__ == "cmd_operator"
        assert config_from_args(parsed, {}).training.default_image.endswith("trainer:0.1.0")
    webhook = _parse(_operator_args(renders["namespaced-values.yaml"]["objects"]))
    assert webhook.webhook_port == 9443 and webhook.webhook_cert == "/etc/kubetune/webhook/tls.crt"
    config = config_from_args(webhook, {})
    assert config.serving.default_image == "registry.example.com/kubetune/vllm:0.1.0"
    assert config.webhook is not None and config.webhook.port == 9443 and config.webhook.cert == "/etc/kubetune/webhook/tls.crt"
    assert webhook.namespace == ["team-a", "team-b"] and webhook.peering == "kubetune"


def test_chart_passes_the_job_s3_defaults(defaults: dict[str, Any], renders: dict[str, dict[str, Any]]) -> None:
    """`jobs.s3.*` (falling back to `s3.endpoint`) become the operator's --default-s3-* flags:
    the S3 settings of job and serving pods whose manifest sets none. Only the Secret's name
    is passed; its values stay in the Secret."""
    from kubetune.operator.common import StorageDefaults
    from kubetune.operator.config import config_from_args

    assert not any(a.startswith("--default-s3") for a in _operator_args(defaults["objects"]))
    args = _operator_args(renders["namespaced-values.yaml"]["objects"])
    assert "--default-s3-endpoint=http://minio.minio:9000" in args  # from s3.endpoint
    assert "--default-s3-secret=team-s3" in args
    config = config_from_args(_parse(args), {})
    expected = StorageDefaults("http://minio.minio:9000", "team-s3")
    assert config.training.storage_defaults == expected and config.serving.storage_defaults == expected


PLATFORM_DEFAULTS = {
    "nodeSelector": {"pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "podTemplate": {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                    "spec": {"imagePullSecrets": [{"name": "registry"}],
                             "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "team-fs"}}]},
                    "container": {"volumeMounts": [{"name": "shared", "mountPath": "/mnt/shared"}]}},
}


def test_chart_passes_the_platform_defaults(defaults: dict[str, Any], tmp_path: Path) -> None:
    """`platformDefaults` becomes a ConfigMap mounted into the operator and its
    --platform-defaults flag (with a checksum annotation, so a change restarts the operator);
    the operator reads back exactly the value. `serving.prometheusAddress` becomes
    --prometheus-address. Neither appears with the default values."""
    from kubetune.operator.config import config_from_args
    from kubetune.operator.overrides import PlatformDefaults

    assert not [o for o in defaults["objects"] if o["kind"] == "ConfigMap" and "platform" in o["metadata"]["name"]]
    assert not any(a.startswith(("--platform-defaults", "--prometheus-address")) for a in _operator_args(defaults["objects"]))
    result = installed({"platformDefaults": PLATFORM_DEFAULTS,
                        "serving": {"prometheusAddress": "http://prometheus.monitoring:9090"}}, tmp_path)
    objects = result["objects"]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-platform-defaults")]
    text = config_map["data"]["platform-defaults.json"]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["kubetune.io/platform-defaults-checksum"]
    args = _operator_args(objects)
    flag = next(a for a in args if a.startswith("--platform-defaults="))
    path = flag.split("=", 1)[1]
    (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    local = tmp_path / "platform-defaults.json"
    local.write_text(text)
    config = config_from_args(_parse([a if a != flag else f"--platform-defaults={local}" for a in args]), {})
    expected = PlatformDefaults.model_validate(PLATFORM_DEFAULTS)
    assert config.training.platform_defaults == expected and config.serving.platform_defaults == expected
    assert config.serving.prometheus_address == "http://prometheus.monitoring:9090"


def test_chart_serving_defaults_match_the_engines(defaults: dict[str, Any], renders: dict[str, dict[str, Any]]) -> None:
    """With the chart's defaults the operator gives `engine: vllm` (the CRD's default engine) the
    kubetune-vllm image and `engine: transformers` the trainer image (which has no vLLM), and
    hostPath caches live under serving.hostPathCacheRoot."""
    from kubetune.operator.config import config_from_args
    from kubetune.operator.resources import InferenceServiceSpec

    args = _operator_args(defaults["objects"])
    assert "--vllm-image=ghcr.io/kubetune/kubetune-vllm:0.1.0" in args
    assert "--host-cache-root=/var/lib/kubetune/cache" in args
    options = config_from_args(_parse(args), {}).serving
    default_engine = InferenceServiceSpec.model_fields["engine"].default
    assert default_engine == "vllm" and options.image_for(default_engine) == "ghcr.io/kubetune/kubetune-vllm:0.1.0"
    assert options.image_for("transformers") == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert options.host_cache_root == "/var/lib/kubetune/cache"


def test_operator_serves_metrics_on_the_port_the_chart_passes(renders: dict[str, dict[str, Any]]) -> None:
    from kubetune.operator.config import config_from_args

    args = _operator_args(renders["namespaced-values.yaml"]["objects"])
    port = next(a.split("=", 1)[1] for a in args if a.startswith("--metrics-port="))
    assert config_from_args(_parse(args), {}).metrics_port == int(port)


# --------------------------------------------------------------------------------------------
# RBAC == what the operator calls

# The rules are compared with every call the real operator makes, as the real API server's
# audit log records them, in tests/test_operator_real.py (test_rbac_is_exactly_what_the_operator_called).


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_covers_every_resource_the_operator_watches(peered: dict[str, Any]) -> None:
    """kopf lists and watches every resource a handler is registered for: a new kind of handler
    (e.g. InferenceService) fails here until the chart grants it."""
    import kopf

    from kubetune.operator.config import OperatorConfig, WebhookConfig
    from kubetune.operator.handlers import register

    registry = register(kopf.OperatorRegistry(), OperatorConfig(webhook=WebhookConfig(port=9443)))
    handlers = [*registry._changing.get_all_handlers(), *registry._watching.get_all_handlers(),
                *registry._spawning.get_all_handlers(), *registry._webhooks.get_all_handlers()]
    watched = {(h.selector.group or "", h.selector.plural or h.selector.any_name) for h in handlers if h.selector is not None}
    assert ("kubetune.io", "finetunejobs") in watched and ("batch", "jobs") in watched, watched
    granted = _granted(one(peered["objects"], "ClusterRole")["rules"])
    for group, plural in watched:
        assert {(group, plural, "list"), (group, plural, "watch")} <= granted, f"{group}/{plural} is watched but not granted"


def test_namespaced_rbac_has_the_same_rules(renders: dict[str, dict[str, Any]], peered: dict[str, Any]) -> None:
    cluster_rules = _granted(one(peered["objects"], "ClusterRole")["rules"])
    for role in by_kind(renders["namespaced-values.yaml"]["objects"], "Role"):
        namespaced = _granted(role["rules"])
        assert namespaced == {(g, "kopfpeerings" if r == "clusterkopfpeerings" else r, v) for g, r, v in cluster_rules}


# --------------------------------------------------------------------------------------------
# the console (console.enabled): its own Deployment, Service, ServiceAccount and RBAC

CONSOLE_COMPONENT = "console"
AUTH_PROXY = {"image": "quay.io/oauth2-proxy/oauth2-proxy:v7.9.0",
              "args": ["--upstream=http://127.0.0.1:8090", "--http-address=0.0.0.0:4180", "--pass-user-headers"]}


def console_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == CONSOLE_COMPONENT]


def _console_container(objects: list[dict[str, Any]], name: str = "console") -> dict[str, Any]:
    pod = one(console_objects(objects), "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


@pytest.fixture(scope="module")
def with_console(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return installed({"console": {"enabled": True, "namespace": "team-a", "s3CredentialsSecret": "console-s3"}},
                     tmp_path_factory.mktemp("console"))


def test_console_renders_restricted_with_a_token_and_exactly_its_rbac(with_console: dict[str, Any]) -> None:
    objects = with_console["objects"]
    mine = console_objects(objects)
    assert sorted(o["kind"] for o in mine) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Secret", "Service",
                                               "ServiceAccount"]
    for obj in mine:
        _validate(obj)
    deploy = one(mine, "Deployment")
    pod = deploy["spec"]["template"]
    # Its pods are not the operator's: neither Deployment's selector selects the other's pods.
    operator = next(d for d in by_kind(objects, "Deployment") if d not in mine)
    for selector, labels in ((operator["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]),
                             (deploy["spec"]["selector"]["matchLabels"], operator["spec"]["template"]["metadata"]["labels"])):
        assert not selector.items() <= labels.items()
    container = _console_container(objects)
    parsed = _parse(container["args"])
    assert parsed.func.__name__ == "cmd_console" and parsed.in_cluster and parsed.no_local_runs
    assert (parsed.host, parsed.port, parsed.namespace, parsed.impersonate_user_header) == ("0.0.0.0", 8090, "team-a", None)
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"
    # Off loopback the console needs its token: from the chart's Secret (random, 40 characters).
    (token,) = [e for e in container["env"] if e["name"] == "KUBETUNE_CONSOLE_TOKEN"]
    secret = one(mine, "Secret")
    assert token["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "token"}
    assert len(base64.b64decode(secret["data"]["token"])) == 40
    assert container["envFrom"] == [{"secretRef": {"name": "console-s3"}}]  # its S3 identity, for jobs' curves
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Restricted pod security (checked by the real API server's PodSecurity admission in
    # tests/test_console_cluster.py): non-root, seccomp, no privilege escalation, no capabilities.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["serviceAccountName"] == one(mine, "ServiceAccount")["metadata"]["name"]
    assert one(mine, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    assert _granted(one(mine, "ClusterRole")["rules"]) == {
        ("kubetune.io", r, v) for r in ("finetunejobs", "alignmentjobs", "inferenceservices") for v in ("get", "list", "create")
    } | {("", "events", "list"), ("", "pods", "list"), ("", "pods/log", "get")}
    assert "port-forward svc/kubetune-console 8090:80" in with_console["notes"]
    assert f"get secret {secret['metadata']['name']}" in with_console["notes"]
    binding = one(mine, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(mine, "ServiceAccount")["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]


def test_console_token_is_kept_on_upgrade(tmp_path: Path) -> None:
    """The chart's random token survives `helm upgrade` (read back with `lookup`): a browser's
    cookie stays valid. A new install gets a new token."""
    result = helm_install({"console": {"enabled": True}}, tmp_path, upgrade=True)
    assert "error" not in result, result.get("error")
    tokens = [one(console_objects(objects), "Secret")["data"]["token"] for objects in (result["installed"], result["objects"])]
    assert tokens[0] == tokens[1]
    (tmp_path / "again").mkdir()
    again = installed({"console": {"enabled": True}}, tmp_path / "again")
    assert one(console_objects(again["objects"]), "Secret")["data"]["token"] != tokens[0]


def test_console_impersonation_needs_its_proxy_and_grants_only_impersonate(tmp_path: Path) -> None:
    (tmp_path / "proxied").mkdir()
    refused = helm_install({"console": {"enabled": True, "impersonation": {"enabled": True}}}, tmp_path)
    assert "needs console.impersonation.proxy" in refused.get("error", ""), refused
    objects = installed({"console": {"enabled": True, "impersonation": {"enabled": True, "proxy": AUTH_PROXY}}},
                        tmp_path / "proxied")["objects"]
    mine = console_objects(objects)
    for obj in mine:
        _validate(obj)
    assert not by_kind(mine, "Secret")  # no token: only the proxy reaches the console
    parsed = _parse(_console_container(objects)["args"])
    assert parsed.host == "127.0.0.1" and parsed.impersonate_user_header == "X-Forwarded-User"
    assert parsed.impersonate_groups_header == "X-Forwarded-Groups"
    assert _granted(one(mine, "ClusterRole")["rules"]) == {("", "users", "impersonate"), ("", "groups", "impersonate")}
    proxy = _console_container(objects, "auth-proxy")
    assert proxy["ports"] == [{"name": "proxy", "containerPort": 4180, "protocol": "TCP"}]
    assert proxy["args"] == AUTH_PROXY["args"] and proxy["securityContext"]["runAsNonRoot"] is True
    assert one(mine, "Service")["spec"]["ports"][0]["targetPort"] == "proxy"
    probe = _console_container(objects)["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"] and "127.0.0.1:8090/healthz" in probe[2]


if __name__ == "__main__":  # one `helm install` into the emulator (see helm_install)
    _values = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(asyncio.run(_install(_values, Path(sys.argv[2]), upgrade=sys.argv[3:] == ["upgrade"]))))
