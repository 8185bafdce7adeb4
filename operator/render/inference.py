"""InferenceService -> Deployment + Service + (when minReplicas < maxReplicas) an autoscaling/v2 HPA.

Pure functions: the custom resource (a dict) and the resolved model/adapter locations in, the
manifests out. The pod:

- init container `fetch`: `python -m kubetune.operator.fetch` downloads the model, every adapter
  (and the base model of a LoRA output, and a draft model) with the storage layer (parallel
  ranged GETs, verified, atomic) into the model cache volume. The cache is keyed by each object's
  ETag: a second replica on the node (hostPath), a later pod (hostPath, PVC) or a restarted
  container (emptyDir) finds the same version there and downloads nothing.
- container `server`: `kubetune serve URI --adapter NAME=URI ... --engine vllm|transformers`, an
  argument list (no shell). It resolves the same URIs through the same cache (one LIST per URI,
  no download) and, with vLLM, execs vLLM's OpenAI server with `--enable-lora --lora-modules`.
- probes: startup on `/health` for up to `startupTimeoutSeconds` (big models load slowly),
  liveness `/health`, readiness `/ready` (kubetune serve: the model is loaded) or `/health`
  (vLLM answers only once the engine is up).
- stopping: a preStop `sleep` (no shell) lets the endpoints drop the pod before SIGTERM, then the
  server drains in-flight requests (`--drain-timeout`) within terminationGracePeriodSeconds.
- rolling updates with maxUnavailable 0: a spec change (new model version, engine argument)
  never lowers the serving capacity.
- adapters are *not* in the pod template (with either engine), so changing them restarts nothing:
  the operator writes the current set (references resolved) into the ConfigMap
  `<name>-isvc-adapters`, mounted at /etc/kubetune/adapters. The init container fetches the whole
  set from it (so a pod started later, by a scale-up or a node drain, starts with the current
  set), and a sidecar `adapters` (`python -m kubetune.operator.adapters`) keeps the server in line
  with it: when the kubelet refreshes the mounted file it fetches new adapters into the cache and
  loads them through the server's runtime LoRA API (`/v1/load_lora_adapter`: vLLM's, with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, or `kubetune serve`'s own, which speaks the same API),
  unloads removed ones and reloads changed ones in place. Its readiness (`/ready`) holds a new pod
  out of the Service until every adapter is loaded. With vLLM, LoRA support itself
  (`--enable-lora`, `--max-loras`, `--max-lora-rank`) is a start-up setting: turning it on or off
  (the first adapter, the last one removed, unless `engineArgs.maxLoras` keeps it on) rolls the
  pods once. The transformers engine (`kubetune serve`) needs no such setting: its pods always
  run the sidecar.
- a hostPath cache: the kubelet creates the directory owned by root, so an init container
  `cache-permissions` (uid 0, only CAP_CHOWN, no shell) hands it to the pods' user first.
- non-root, read-only root filesystem; writable emptyDirs at /tmp and /cache.

Autoscaling on the server's own metrics needs the Prometheus adapter to publish them as pods
metrics. `kubetune serve` exports `kubetune_requests_in_flight` and `kubetune_queue_depth`;
vLLM exports `vllm:num_requests_running` and `vllm:num_requests_waiting`. The adapter rules
below publish both under kubetune's names, so one HPA spec fits either engine:

    rules:
      - seriesQuery: 'kubetune_requests_in_flight{namespace!="",pod!=""}'
        resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
        name: {as: "kubetune_requests_in_flight"}
        metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
      - seriesQuery: 'kubetune_queue_depth{namespace!="",pod!=""}'
        resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
        name: {as: "kubetune_queue_depth"}
        metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
      # vLLM pods: running + waiting requests, and waiting requests, under the same names.
      - seriesQuery: 'vllm:num_requests_running{namespace!="",pod!=""}'
        resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
        name: {as: "kubetune_requests_in_flight"}
        metricsQuery: 'sum(vllm:num_requests_running{<<.LabelMatchers>>} + vllm:num_requests_waiting{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
      - seriesQuery: 'vllm:num_requests_waiting{namespace!="",pod!=""}'
        resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
        name: {as: "kubetune_queue_depth"}
        metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'

(Prometheus must scrape the pods: they carry `prometheus.io/scrape|port|path` annotations.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.render.common import (
    StorageDefaults,
    child_names,
    effective_storage,
    labels_for,
    owner_reference,
    pod_security_context,
    scheduling_fields,
    selector_labels,
    storage_env,
)
from kubetune.operator.resources import InferenceServiceSpec, validate_spec

KIND = "InferenceService"
SERVER = "server"
FETCHER = "fetch"
AGENT = "adapters"
"""The sidecar that loads adapters into the running server (`python -m kubetune.operator.adapters`)."""
PERMISSIONS = "cache-permissions"
ADAPTERS_MOUNT = "/etc/kubetune/adapters"
ADAPTERS_KEY = "adapters.json"
ADAPTERS_FILE = f"{ADAPTERS_MOUNT}/{ADAPTERS_KEY}"
DEFAULT_MAX_LORAS = 4
"""vLLM adapter slots per batch when the spec does not say (vLLM's own default, 1, serialises
requests for different adapters)."""
COMPONENT = "server"
CACHE_MOUNT = "/var/cache/kubetune"
"""Where the model cache volume is mounted (KUBETUNE_CACHE) in both containers."""
DEFAULT_HOST_CACHE = "/var/cache/kubetune"
SERVICE_PORT = 80
RUN_AS_USER = 1000
PRESTOP_SLEEP_SECONDS = 5
"""After the pod is marked terminating, endpoints controllers and proxies need a moment to stop
sending it new requests; SIGTERM comes after this sleep."""
STARTUP_PERIOD_SECONDS = 10
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"
"""Hash of what the operator rendered: a child is patched only when it changes."""
METRIC_NAMES = {"requestsInFlight": "kubetune_requests_in_flight", "queueDepth": "kubetune_queue_depth"}


@dataclass(frozen=True)
class ServingOptions:
    """Operator-wide settings of the serving pods."""

    default_image: str = "ghcr.io/kubetune/kubetune-server:0.1.0"
    run_as_user: int = RUN_AS_USER
    storage_defaults: StorageDefaults = field(default_factory=StorageDefaults)
    """S3 endpoint/Secret for services whose spec.storage sets none (`--default-s3-*`)."""

    @classmethod
    def from_environment(cls) -> ServingOptions:
        image = os.environ.get("KUBETUNE_SERVER_IMAGE") or os.environ.get("KUBETUNE_TRAINER_IMAGE")
        defaults = StorageDefaults.from_environment()
        return cls(default_image=image, storage_defaults=defaults) if image else cls(storage_defaults=defaults)


@dataclass(frozen=True)
class ResolvedModels:
    """Model and adapter locations with job references replaced by the jobs' output URIs."""

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    """Served name -> location, in spec order."""


def served_name(cr: dict[str, Any], spec: InferenceServiceSpec) -> str:
    return spec.model.name or cr["metadata"]["name"]


def service_names(name: str) -> tuple[str, str]:
    """(Deployment/Service/HPA name, DNS of the Service) for a resource name."""
    base = child_names(KIND, name).base
    return base, base


def url_of(cr: dict[str, Any]) -> str:
    """The OpenAI base URL inside the cluster."""
    meta = cr["metadata"]
    base, _ = service_names(meta["name"])
    return f"http://{base}.{meta.get('namespace') or 'default'}.svc/v1"


def pod_selector(name: str) -> dict[str, str]:
    return {**selector_labels(KIND, name), "app.kubernetes.io/component": COMPONENT}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pod_selector(name).items()))


def spec_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _meta(cr: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cr["metadata"].get("namespace") or "default",
        "labels": labels_for(KIND, cr["metadata"]["name"], component),
        "ownerReferences": [owner_reference(cr)],
    }


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def runtime_adapters(spec: InferenceServiceSpec) -> bool:
    """Whether adapters are loaded into running pods (the server's runtime LoRA API, driven by the
    pod's `adapters` sidecar from the adapters ConfigMap) instead of being server arguments.
    Then an adapter-only change is no pod template change, hence no restart. Always with the
    transformers engine (`kubetune serve` loads adapters at runtime with no start-up setting);
    with vLLM once LoRA is on (an adapter, or `engineArgs.maxLoras`)."""
    if spec.engine == "transformers":
        return True
    return bool(spec.adapters) or spec.engineArgs.maxLoras is not None


def adapters_config_name(name: str) -> str:
    """The ConfigMap holding a service's current adapter set."""
    base, _ = service_names(name)
    return f"{base}-adapters"


def adapters_document(models: ResolvedModels) -> str:
    """The adapters file the init container and the sidecar read (references resolved)."""
    items = [{"name": n, "uri": u} for n, u in models.adapters.items()]
    return json.dumps({"adapters": items}, indent=2) + "\n"


def agent_port(spec: InferenceServiceSpec) -> int:
    """The sidecar's probe port: next to the server's (never the same)."""
    return spec.port + 1 if spec.port < 65535 else spec.port - 1


def _common_env(spec: InferenceServiceSpec, defaults: StorageDefaults | None = None) -> list[dict[str, Any]]:
    return [
        _env("PYTHONUNBUFFERED", "1"),
        # Read-only root filesystem: homes and caches live on emptyDirs; models on the cache volume.
        _env("HOME", "/tmp/home"),
        _env("XDG_CACHE_HOME", "/cache"),
        _env("KUBETUNE_CACHE", CACHE_MOUNT),
        _env("HF_HOME", "/cache/huggingface"),
        _env("TRITON_CACHE_DIR", "/cache/triton"),
        _env("TORCH_EXTENSIONS_DIR", "/cache/torch_extensions"),
        _env("VLLM_CACHE_ROOT", "/cache/vllm"),
        _env("VLLM_CONFIG_ROOT", "/cache/vllm-config"),
        _env("NUMBA_CACHE_DIR", "/cache/numba"),
        _env("OUTLINES_CACHE_DIR", "/cache/outlines"),
        _env("MPLCONFIGDIR", "/tmp/matplotlib"),
        *storage_env(effective_storage(spec, defaults)),
    ]


def _with_user_env(env: list[dict[str, Any]], spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    user = [e.model_dump(mode="json", exclude_none=True) for e in spec.env]
    names = {e["name"] for e in user}
    return [e for e in env if e["name"] not in names] + user


def drain_seconds(spec: InferenceServiceSpec) -> int:
    """What the server gets after SIGTERM to finish in-flight requests (inside the grace period)."""
    return max(1, spec.terminationGracePeriodSeconds - PRESTOP_SLEEP_SECONDS - 5)


def fetch_args(spec: InferenceServiceSpec, models: ResolvedModels) -> list[str]:
    """The init container's arguments (its command is `python -m kubetune.operator.fetch`)."""
    args = ["--model", models.model]
    if runtime_adapters(spec):
        args += ["--adapters-file", ADAPTERS_FILE]  # the current set, also for pods started later
    else:
        for name, location in models.adapters.items():
            args += ["--adapter", f"{name}={location}"]
    if spec.engineArgs.draftModel:
        args += ["--draft-model", spec.engineArgs.draftModel]
    return args


def serve_args(cr: dict[str, Any], spec: InferenceServiceSpec, models: ResolvedModels) -> list[str]:
    """The server container's arguments (its command is `kubetune`)."""
    e = spec.engineArgs
    args = [
        "serve", models.model,
        "--engine", spec.engine,
        "--served-model-name", served_name(cr, spec),
        "--host", "0.0.0.0",
        "--port", str(spec.port),
        "--dtype", e.dtype,
        "--drain-timeout", str(drain_seconds(spec)),
    ]
    if not runtime_adapters(spec):
        for name, location in models.adapters.items():
            args += ["--adapter", f"{name}={location}"]
    if e.maxModelLen:
        args += ["--max-model-len", str(e.maxModelLen)]
    if e.maxBatchSize:
        args += ["--max-batch-size", str(e.maxBatchSize)]
    if e.draftModel:
        args += ["--draft-model", e.draftModel]
        if e.numSpeculativeTokens:
            args += ["--num-assistant-tokens", str(e.numSpeculativeTokens)]
    if spec.engine == "vllm":
        tp = spec.tensorParallelSize or (spec.gpus if spec.gpus > 1 else None)
        if tp:
            args += ["--tensor-parallel-size", str(tp)]
        if e.quantization:
            args += ["--quantization", e.quantization]
        if e.gpuMemoryUtilization:
            args += ["--gpu-memory-utilization", str(e.gpuMemoryUtilization)]
        if runtime_adapters(spec):
            # Fixed LoRA capacity: it must not depend on the adapter list, or every change would
            # change the pod template. The adapters themselves come from the sidecar.
            args += ["--vllm-arg=--enable-lora", f"--vllm-arg=--max-loras={e.maxLoras or DEFAULT_MAX_LORAS}"]
            if e.maxLoraRank:
                args.append(f"--vllm-arg=--max-lora-rank={e.maxLoraRank}")
        for extra in e.extraArgs:
            args.append(f"--vllm-arg={extra}")  # one token: a value starting with `-` stays a value
    return args


def _cache_volume(spec: InferenceServiceSpec) -> dict[str, Any]:
    cache = spec.cache
    if cache.type == "hostPath":
        return {"name": "model-cache", "hostPath": {"path": cache.path or DEFAULT_HOST_CACHE, "type": "DirectoryOrCreate"}}
    if cache.type == "pvc":
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claimName}}
    empty: dict[str, Any] = {}
    if cache.sizeLimit is not None:
        empty["sizeLimit"] = cache.sizeLimit
    return {"name": "model-cache", "emptyDir": empty}


def _permissions_container(image: str, uid: int, pull_policy: str | None) -> dict[str, Any]:
    """Hands a hostPath cache to the pods' user. The kubelet creates a missing hostPath directory
    owned by root (mode 0755), fsGroup does not apply to hostPath volumes, and the other
    containers run as `uid`: without this they could not write the cache. It runs as root with
    every capability dropped but CHOWN, changes the top directory only (what is below was
    written by `uid`), and its argv holds no value from the resource."""
    container: dict[str, Any] = {
        "name": PERMISSIONS,
        "image": image,
        "command": ["chown", f"{uid}:{uid}", CACHE_MOUNT],
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    return container


def _agent_container(cr: dict[str, Any], spec: InferenceServiceSpec, image: str, env: list[dict[str, Any]],
                     mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The sidecar that keeps the server's loaded adapters equal to the adapters file. Its readiness
    keeps a new pod out of the Service until the pod serves every adapter; its argv holds no
    value from the resource but the served name (validated: no `/`, `:`, `=` or spaces)."""
    port = agent_port(spec)
    return {
        "name": AGENT,
        "image": image,
        "command": ["python", "-m", "kubetune.operator.adapters"],
        "args": ["--config", ADAPTERS_FILE, "--server", f"http://127.0.0.1:{spec.port}", "--port", str(port),
                 "--keep", served_name(cr, spec)],
        "env": env,
        "ports": [{"name": "agent", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "agent"}, "periodSeconds": 5, "timeoutSeconds": 3,
                           "failureThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "agent"}, "periodSeconds": 20, "timeoutSeconds": 5,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": mounts,
        "securityContext": _security(spec),
    }


def render_adapters_config_map(cr: dict[str, Any], spec: InferenceServiceSpec, models: ResolvedModels) -> dict[str, Any]:
    """The ConfigMap with the current adapter set (pods mount it when `runtime_adapters`)."""
    data = {ADAPTERS_KEY: adapters_document(models)}
    meta = _meta(cr, adapters_config_name(cr["metadata"]["name"]), COMPONENT)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(data)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _security(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": spec.readOnlyRootFilesystem,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def desired_replicas(spec: InferenceServiceSpec) -> int:
    """Replicas of the Deployment when no HPA manages them (the initial count when one does)."""
    if spec.autoscaled:
        return spec.minReplicas
    return spec.replicas if spec.replicas is not None else spec.minReplicas


def render_deployment(
    cr: dict[str, Any], spec: InferenceServiceSpec, models: ResolvedModels, options: ServingOptions | None = None
) -> dict[str, Any]:
    options = options or ServingOptions()
    name = cr["metadata"]["name"]
    deploy_name, _ = service_names(name)
    image = spec.image or options.default_image
    resources: dict[str, Any] = {"requests": dict(spec.resources.requests), "limits": dict(spec.resources.limits)}
    if spec.gpus > 0:
        resources["requests"][spec.gpuResource] = spec.gpus
        resources["limits"][spec.gpuResource] = spec.gpus
    resources = {k: v for k, v in resources.items() if v}
    common_mounts = [
        {"name": "model-cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    runtime = runtime_adapters(spec)
    adapter_mounts = [{"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True}] if runtime else []
    env = _with_user_env(_common_env(spec, options.storage_defaults), spec)
    http_get = {"path": "/health", "port": "http"}
    fetcher: dict[str, Any] = {
        "name": FETCHER,
        "image": image,
        "command": ["python", "-m", "kubetune.operator.fetch"],
        "args": fetch_args(spec, models),
        "env": copy.deepcopy(env),
        "volumeMounts": [*copy.deepcopy(common_mounts), *copy.deepcopy(adapter_mounts)],
        "securityContext": _security(spec),
    }
    server_env = copy.deepcopy(env)
    if runtime and spec.engine == "vllm" and not any(e["name"] == "VLLM_ALLOW_RUNTIME_LORA_UPDATING" for e in server_env):
        server_env.append(_env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"))
    server: dict[str, Any] = {
        "name": SERVER,
        "image": image,
        "command": ["kubetune"],
        "args": serve_args(cr, spec, models),
        "env": server_env,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "volumeMounts": [*copy.deepcopy(common_mounts), {"name": "dshm", "mountPath": "/dev/shm"}],
        "startupProbe": {
            "httpGet": dict(http_get),
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, spec.startupTimeoutSeconds // STARTUP_PERIOD_SECONDS),
        },
        "livenessProbe": {"httpGet": dict(http_get), "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
        "readinessProbe": {
            "httpGet": {"path": "/ready" if spec.engine == "transformers" else "/health", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": _security(spec),
    }
    if resources:
        server["resources"] = resources
        # The init container downloads with CPU and memory only.
        fetch_resources = {
            block: {k: v for k, v in values.items() if not k.endswith("/gpu") and k != spec.gpuResource}
            for block, values in resources.items()
        }
        fetch_resources = {k: v for k, v in fetch_resources.items() if v}
        if fetch_resources:
            fetcher["resources"] = fetch_resources
    if spec.imagePullPolicy:
        server["imagePullPolicy"] = fetcher["imagePullPolicy"] = spec.imagePullPolicy
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.shmSize is not None:
        shm["sizeLimit"] = spec.shmSize
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": spec.terminationGracePeriodSeconds,
        "securityContext": pod_security_context(options.run_as_user),
        "initContainers": [fetcher],
        "containers": [server],
        "volumes": [
            _cache_volume(spec),
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": shm},
        ],
    }
    if spec.cache.type == "hostPath":
        pod_spec["initContainers"].insert(0, _permissions_container(image, options.run_as_user, spec.imagePullPolicy))
    if runtime:
        agent = _agent_container(cr, spec, image, copy.deepcopy(env),
                                 [*copy.deepcopy(common_mounts), *copy.deepcopy(adapter_mounts)])
        if spec.imagePullPolicy:
            agent["imagePullPolicy"] = spec.imagePullPolicy
        pod_spec["containers"].append(agent)
        pod_spec["volumes"].append({"name": "adapters", "configMap": {
            "name": adapters_config_name(name), "items": [{"key": ADAPTERS_KEY, "path": ADAPTERS_KEY}]}})
    pod_spec.update(scheduling_fields(spec))
    pod_labels = labels_for(KIND, name, COMPONENT)
    deployment_spec: dict[str, Any] = {
        "replicas": desired_replicas(spec),
        "selector": {"matchLabels": pod_selector(name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "minReadySeconds": 5,
        "revisionHistoryLimit": 5,
        # Downloading and loading a big model takes a while before a new pod is ready.
        "progressDeadlineSeconds": spec.startupTimeoutSeconds + 1800,
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {
                    "kubectl.kubernetes.io/default-container": SERVER,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(spec.port),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    meta = _meta(cr, deploy_name, COMPONENT)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash({k: v for k, v in deployment_spec.items() if k != "replicas"})}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": deployment_spec}


def render_service(cr: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    service_name, _ = service_names(name)
    body = {
        "type": spec.serviceType,
        "selector": pod_selector(name),
        "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
    }
    meta = _meta(cr, service_name, COMPONENT)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(body)}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def render_hpa(cr: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """The autoscaling/v2 HPA on the Deployment, or None when min == max (then `spec.replicas`,
    i.e. `kubectl scale`, sets the replicas)."""
    if not spec.autoscaled:
        return None
    name = cr["metadata"]["name"]
    hpa_name, _ = service_names(name)
    scaling = spec.autoscaling
    if scaling.metric == "cpu":
        metric: dict[str, Any] = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.effective_target}},
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": METRIC_NAMES[scaling.metric]},
                "target": {"type": "AverageValue", "averageValue": str(scaling.effective_target)},
            },
        }
    body = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": hpa_name},
        "minReplicas": spec.minReplicas,
        "maxReplicas": spec.maxReplicas,
        "metrics": [metric],
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                        "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}]},
            "scaleDown": {"stabilizationWindowSeconds": scaling.scaleDownStabilizationSeconds, "selectPolicy": "Max",
                          "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
        },
    }
    meta = _meta(cr, hpa_name, COMPONENT)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(body)}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": body}


def render_inference(
    cr: dict[str, Any], models: ResolvedModels | None = None, options: ServingOptions | None = None
) -> list[dict[str, Any]]:
    """Every child of an InferenceService: Deployment, Service, adapters ConfigMap, and the HPA
    when autoscaled.
    Without `models`, the spec's URIs are used (job references must be resolved by the caller)."""
    spec: InferenceServiceSpec = validate_spec(KIND, cr.get("spec"))  # type: ignore[assignment]
    if models is None:
        if spec.model.uri is None or any(a.uri is None for a in spec.adapters):
            raise ValueError("job references must be resolved: pass models=ResolvedModels(...)")
        models = ResolvedModels(spec.model.uri, {a.name: a.uri for a in spec.adapters if a.uri})
    objs = [render_deployment(cr, spec, models, options), render_service(cr, spec),
            render_adapters_config_map(cr, spec, models)]
    hpa = render_hpa(cr, spec)
    if hpa is not None:
        objs.append(hpa)
    return objs
