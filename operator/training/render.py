"""FineTuneJob / AlignmentJob -> ConfigMap + headless Service + Indexed batch/v1 Job (and, with
an `s3://` `data.cache`, a one-pod CPU-only prepare Job that tokenizes the datasets first; with
`spec.gang`, the PodGroup of a gang scheduler that the Job's pods join).

The pod runs exactly what a user runs locally: `kubetune train /etc/kubetune/job.yaml`, where
job.yaml is the resolved custom resource (defaults filled in, references resolved), under
torchrun with a static rendezvous: `--nnodes`, `--nproc-per-node`, the node rank from the
Indexed Job's completion index, and the master at pod 0's stable DNS name
(`<job>-0.<service>.<namespace>.svc`, through the headless Service and the pods' `subdomain`).
No SSH, no hostfile, no shell: every command is an argument list, and the only `$(...)` in it
are Kubernetes' own expansions of environment variables the operator defines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from kubetune.operator.common import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_TRAINING_HASH,
    LABEL_ATTEMPT,
    StorageDefaults,
    child_names,
    effective_storage,
    labels_for,
    owner_reference,
    pod_security_context,
    queued,
    scheduling_fields,
    selector_labels,
    storage_env,
    with_propagated,
)
from kubetune.operator.overrides import PlatformDefaults, customized
from kubetune.operator.resources import (
    BASE_MODEL_PLACEHOLDER,
    AlignmentJobSpec,
    ClusterFields,
    validate_spec,
)
from kubetune.trainer.artifacts.datacache import CACHE_AUTO, cluster_default_cache

CONTAINER = "trainer"
CONFIG_DIR = "/etc/kubetune"
JOB_FILE = "job.yaml"
DISRUPTION_CONDITION = "DisruptionTarget"
"""The pod condition Kubernetes sets on a pod it preempts, evicts or drains."""
MASTER_PORT = 29500
CONFIG_ERROR_EXIT_CODE = 2
"""The trainer's exit code for a wrong spec (kubetune.trainer.api.errors.EXIT_CONFIG_ERROR): the Job
fails at once instead of restarting a gang that cannot succeed."""
RUN_AS_USER = 1000
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
POD_GROUP_API = {"coscheduling": "scheduling.x-k8s.io/v1alpha1", "volcano": "scheduling.volcano.sh/v1beta1"}
"""The PodGroup each gang scheduler reads (`spec.gang.scheduler`)."""
COSCHEDULING_POD_LABEL = "scheduling.x-k8s.io/pod-group"
"""The pod label naming its PodGroup for the coscheduling plugin (scheduler-plugins v0.28+)."""
VOLCANO_POD_ANNOTATION = "scheduling.k8s.io/group-name"
"""The pod annotation naming its PodGroup for Volcano."""


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings that shape the children (from the operator's flags)."""

    default_image: str = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    master_port: int = MASTER_PORT
    run_as_user: int = RUN_AS_USER
    storage_defaults: StorageDefaults = field(default_factory=StorageDefaults)
    """S3 endpoint/Secret for jobs whose spec.storage sets none (`--default-s3-*`)."""
    gpu_memory_gib: float | None = None
    """`--gpu-memory-gib`: GPU memory of jobs without spec.gpuMemoryGiB (the admission check)."""
    platform_defaults: PlatformDefaults | None = None
    """`--platform-defaults`: the platform's pod template and placement under each resource's own."""


def training_hash(training: Any) -> str:
    """A stable hash of spec.training (key order does not matter)."""
    text = json.dumps(training, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _meta(cr: dict[str, Any], name: str, component: str, namespace: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels_for(cr["kind"], cr["metadata"]["name"], component),
        "ownerReferences": [owner_reference(cr)],
    }


def _namespace(cr: dict[str, Any], namespace: str | None) -> str:
    return namespace or cr["metadata"].get("namespace") or "default"


def resolved_manifest(
    cr: dict[str, Any], spec: ClusterFields, references: dict[str, str] | None = None
) -> dict[str, Any]:
    """The custom resource as the pod's job.yaml: defaults filled in, the run named after the
    resource, model references replaced by the referenced jobs' output URIs. `kubetune train`
    reads it like any manifest (it uses `spec.training` and ignores the cluster fields)."""
    references = references or {}
    body = spec.model_dump(mode="json", exclude_none=True)
    training = {"name": body["training"].get("name") or cr["metadata"]["name"], **body["training"]}
    training["name"] = training["name"] or cr["metadata"]["name"]
    if cluster_default_cache(spec.training, spec.nodes).data.cache != spec.training.data.cache:
        training["data"] = {**training["data"], "cache": CACHE_AUTO}  # tokenized once by the prepare Job
    body["training"] = training
    annotations = {}
    if isinstance(spec, AlignmentJobSpec):
        for field in ("baseModelFrom", "rewardModelFrom"):
            ref = getattr(spec, field)
            body.pop(field, None)
            if ref is not None:
                annotations[f"kubetune.io/{field}"] = f"{ref.kind}/{ref.name}"
        if training["model"]["path"] == BASE_MODEL_PLACEHOLDER:
            training["model"]["path"] = references.get("baseModelFrom", BASE_MODEL_PLACEHOLDER)
        if "rewardModelFrom" in references:
            training["reward"] = {**training.get("reward", {}), "model": references["rewardModelFrom"], "function": None}
    metadata: dict[str, Any] = {"name": cr["metadata"]["name"]}
    if cr["metadata"].get("namespace"):
        metadata["namespace"] = cr["metadata"]["namespace"]
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": cr.get("apiVersion"), "kind": cr["kind"], "metadata": metadata, "spec": body}


def render_config_map(
    cr: dict[str, Any],
    spec: ClusterFields,
    *,
    namespace: str | None = None,
    references: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ConfigMap holding job.yaml. Created once when the job starts and never updated, so
    every attempt trains the same spec."""
    ns = _namespace(cr, namespace)
    names = child_names(cr["kind"], cr["metadata"]["name"])
    manifest = resolved_manifest(cr, spec, references)
    meta = _meta(cr, names.config_map, "config", ns)
    meta["annotations"] = {ANNOTATION_TRAINING_HASH: training_hash((cr.get("spec") or {}).get("training"))}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {JOB_FILE: yaml.safe_dump(manifest, sort_keys=False)},
    }


def render_service(cr: dict[str, Any], *, namespace: str | None = None, options: RenderOptions | None = None) -> dict[str, Any]:
    """The headless Service that gives every pod a stable DNS name (`<pod hostname>.<service>`),
    published before the pods are ready so rank 0 is resolvable while the gang starts."""
    options = options or RenderOptions()
    ns = _namespace(cr, namespace)
    names = child_names(cr["kind"], cr["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cr, names.service, "rendezvous", ns),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**selector_labels(cr["kind"], cr["metadata"]["name"]), "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "dist", "port": options.master_port, "targetPort": options.master_port, "protocol": "TCP"}],
        },
    }


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _trainer_env(
    cr: dict[str, Any], spec: ClusterFields, *, master_addr: str, attempt: int, namespace: str, options: RenderOptions
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "KUBETUNE_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        _env("KUBETUNE_NNODES", spec.nodes),
        _env("KUBETUNE_MASTER_ADDR", master_addr),
        _env("KUBETUNE_MASTER_PORT", options.master_port),
        _env("KUBETUNE_ATTEMPT", attempt),
        *_kubetune_env(cr, namespace),
        _env("TRITON_CACHE_DIR", "/cache/triton"),
        _env("TORCH_EXTENSIONS_DIR", "/cache/torch_extensions"),
        # On SIGTERM torchrun forwards the signal to the trainers, then SIGKILLs them after this
        # many seconds (default 30, too short to save and upload a large checkpoint): give them
        # the pod's grace period, less a margin for torchrun itself to exit.
        _env("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", shutdown_timeout(spec.terminationGracePeriodSeconds)),
        # NCCL: fail fast (the gang restarts from a checkpoint) rather than hang on a dead peer.
        _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        _env("NCCL_DEBUG", "WARN"),
        _env("OMP_NUM_THREADS", "1"),
    ]
    if spec.gpusPerNode == 0:
        env.append(_env("DS_ACCELERATOR", "cpu"))
    return _with_storage_and_user_env(env, spec, options)


def _kubetune_env(cr: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """What every trainer-image container gets: which resource it serves, unbuffered output, and
    homes and caches on emptyDirs (the root filesystem is read-only)."""
    return [
        _env("KUBETUNE_RESOURCE", f"{cr['kind'].lower()}/{cr['metadata']['name']}"),
        _env("KUBETUNE_NAMESPACE", namespace),
        _env("PYTHONUNBUFFERED", "1"),
        _env("HOME", "/tmp/home"),
        _env("XDG_CACHE_HOME", "/cache"),
        _env("KUBETUNE_CACHE", "/cache/kubetune"),
        _env("HF_HOME", "/cache/huggingface"),
        _env("MPLCONFIGDIR", "/tmp/matplotlib"),
    ]


def _with_storage_and_user_env(env: list[dict[str, Any]], spec: ClusterFields, options: RenderOptions) -> list[dict[str, Any]]:
    """`env` plus the S3 settings; the user's variables win over both (same name -> replaced)."""
    env = [*env, *storage_env(effective_storage(spec, options.storage_defaults))]
    user = [e.model_dump(mode="json", exclude_none=True) for e in spec.env]
    user_names = {e["name"] for e in user}
    return [e for e in env if e["name"] not in user_names] + user


SHUTDOWN_MARGIN_SECONDS = 10


def shutdown_timeout(grace_period_seconds: int) -> int:
    """Seconds torchrun waits for its trainers after forwarding SIGTERM: the pod's grace period
    less a margin (at least 1), so the trainers' checkpoint upload, not the kubelet's SIGKILL,
    decides when the pod ends."""
    return max(1, grace_period_seconds - SHUTDOWN_MARGIN_SECONDS)


def torchrun_args(spec: ClusterFields, *, master_port: int = MASTER_PORT) -> list[str]:
    """The trainer container's arguments (its command is `torchrun`). Kubernetes expands the
    `$(VAR)` references from the container's own environment; no shell is involved."""
    return [
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={max(1, spec.gpusPerNode)}",
        "--node-rank=$(KUBETUNE_NODE_RANK)",
        "--master-addr=$(KUBETUNE_MASTER_ADDR)",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "--no-python",
        "kubetune",
        "train",
        f"{CONFIG_DIR}/{JOB_FILE}",
    ]


def render_job(
    cr: dict[str, Any],
    spec: ClusterFields,
    *,
    attempt: int,
    namespace: str | None = None,
    options: RenderOptions | None = None,
    active_deadline_seconds: int | None = None,
    suspend: bool | None = None,
) -> dict[str, Any]:
    """The Indexed Job of one attempt: one pod per node, all-or-nothing. `backoffLimit: 0`: any
    failed pod fails the attempt, and the operator restarts the whole gang as a new attempt (a
    lone replacement pod could never rejoin a running torchrun gang)."""
    options = options or RenderOptions()
    ns = _namespace(cr, namespace)
    name = cr["metadata"]["name"]
    names = child_names(cr["kind"], name)
    job_name = names.job(attempt)
    master_addr = "127.0.0.1" if spec.nodes == 1 else f"{job_name}-0.{names.service}.{ns}.svc"
    resources: dict[str, Any] = {
        "requests": dict(spec.resources.requests),
        "limits": dict(spec.resources.limits),
    }
    if spec.gpusPerNode > 0:
        resources["requests"][spec.gpuResource] = spec.gpusPerNode
        resources["limits"][spec.gpuResource] = spec.gpusPerNode
    resources = {k: v for k, v in resources.items() if v}
    pod_labels = {**labels_for(cr["kind"], name, "trainer"), LABEL_ATTEMPT: str(attempt)}
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.shmSize is not None:
        shm["sizeLimit"] = spec.shmSize
    container = _kubetune_container(
        spec, options, name=CONTAINER, command=["torchrun"], args=torchrun_args(spec, master_port=options.master_port),
        env=_trainer_env(cr, spec, master_addr=master_addr, attempt=attempt, namespace=ns, options=options),
        resources=resources, mounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
    )
    container["ports"] = [{"name": "dist", "containerPort": options.master_port, "protocol": "TCP"}]
    pod_spec = _kubetune_pod(spec, options, names.config_map, container, grace=spec.terminationGracePeriodSeconds,
                             volumes=[{"name": "dshm", "emptyDir": shm}])
    pod_spec["subdomain"] = names.service

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": 0,
        **_fail_fast_template(CONTAINER, pod_labels, pod_spec),
        "suspend": _suspend(cr, spec, suspend),
    }
    _join_gang(job_spec["template"], spec, names.base)
    job_spec["template"] = customized(job_spec["template"], spec, options.platform_defaults, CONTAINER)
    deadline = active_deadline_seconds if active_deadline_seconds is not None else spec.activeDeadlineSeconds
    if deadline is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(deadline))
    if spec.ttlSecondsAfterFinished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttlSecondsAfterFinished
    meta = _meta(cr, job_name, "trainer", ns)
    meta["labels"][LABEL_ATTEMPT] = str(attempt)
    meta["annotations"] = {ANNOTATION_ATTEMPT: str(attempt)}
    return with_propagated(cr, {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec})


def render_pod_group(cr: dict[str, Any], spec: ClusterFields, *, namespace: str | None = None) -> dict[str, Any] | None:
    """With `spec.gang`: the PodGroup the gang scheduler places all-or-nothing: `nodes` pods
    (minMember) and the gang's GPUs (minResources), owned by the resource (collected with it).
    One for the resource, not per attempt: an attempt's pods are gone before the next one's
    exist, and the operator creates it (if absent) before each attempt's Job."""
    gang = spec.gang
    if gang is None:
        return None
    group: dict[str, Any] = {"minMember": spec.nodes}
    if spec.gpusPerNode > 0:
        group["minResources"] = {spec.gpuResource: str(spec.nodes * spec.gpusPerNode)}
    if gang.scheduleTimeoutSeconds is not None:
        group["scheduleTimeoutSeconds"] = gang.scheduleTimeoutSeconds
    if gang.queue is not None:
        group["queue"] = gang.queue
    if gang.scheduler == "volcano" and spec.priorityClassName:
        group["priorityClassName"] = spec.priorityClassName
    name = child_names(cr["kind"], cr["metadata"]["name"]).base
    return {"apiVersion": POD_GROUP_API[gang.scheduler], "kind": "PodGroup",
            "metadata": _meta(cr, name, "podgroup", _namespace(cr, namespace)), "spec": group}


def _join_gang(template: dict[str, Any], spec: ClusterFields, group: str) -> None:
    """The training pods join the PodGroup `group` and go to the gang scheduler. Set before the
    podTemplate is applied, so an override's other schedulerName is refused at admission."""
    if spec.gang is None:
        return
    template["spec"]["schedulerName"] = spec.gang.pods_scheduler
    meta = template["metadata"]
    if spec.gang.scheduler == "coscheduling":
        meta["labels"] = {**meta.get("labels", {}), COSCHEDULING_POD_LABEL: group}
    else:
        meta["annotations"] = {**meta.get("annotations", {}), VOLCANO_POD_ANNOTATION: group}


def _suspend(cr: dict[str, Any], spec: ClusterFields, suspend: bool | None) -> bool:
    """A Job starts suspended when asked to, and always when Kueue admits it (queue-name label):
    Kueue unsuspends what it admits."""
    return bool(spec.suspend if suspend is None else suspend) or queued(cr) is not None


PREPARE_CONTAINER = "prepare"
PREPARE_SUFFIX = "-prepare"
PREPARE_GRACE_SECONDS = 30
"""Nothing to save on SIGTERM: an interrupted prepare leaves no marker, and the rerun starts over."""


def prepare_job_name(kind: str, name: str) -> str:
    """`<base>-prepare` (the base leaves room for the suffix, so the name stays a DNS label)."""
    return child_names(kind, name).base + PREPARE_SUFFIX


def prepare_args() -> list[str]:
    """The prepare container's arguments (its command is `kubetune`): no shell, no CR value."""
    return ["prepare", f"{CONFIG_DIR}/{JOB_FILE}"]


def _prepare_env(cr: dict[str, Any], spec: ClusterFields, *, namespace: str, options: RenderOptions) -> list[dict[str, Any]]:
    env = [
        *_kubetune_env(cr, namespace),
        _env("KUBETUNE_PROGRESS", "0"),
        # No GPU is requested; images that expose every GPU by default must not hand them over.
        _env("NVIDIA_VISIBLE_DEVICES", "void"),
        _env("CUDA_VISIBLE_DEVICES", ""),
    ]
    return _with_storage_and_user_env(env, spec, options)


def render_prepare_job(
    cr: dict[str, Any],
    spec: ClusterFields,
    *,
    namespace: str | None = None,
    options: RenderOptions | None = None,
    active_deadline_seconds: int | None = None,
    suspend: bool | None = None,
) -> dict[str, Any]:
    """The one-pod Job that tokenizes the datasets once into `data.cache` (`kubetune prepare`)
    before the training gang exists, so no rank waits at a barrier for tokenization and no GPU
    idles while a CPU tokenizes. Same image, ConfigMap, S3 settings and placement as the gang,
    but no GPU request; a configuration error (exit code 2) fails it at once. It carries no
    attempt label: the gang's attempts count training only, and a gang restart never reruns it."""
    options = options or RenderOptions()
    ns = _namespace(cr, namespace)
    name = cr["metadata"]["name"]
    names = child_names(cr["kind"], name)
    job_name = prepare_job_name(cr["kind"], name)
    # CPU and memory as for the gang (tokenization uses data.numProc processes); GPUs come only
    # from gpusPerNode (the schema refuses them in `resources`), which this pod ignores.
    resources = {k: dict(v) for k, v in (("requests", spec.resources.requests), ("limits", spec.resources.limits)) if v}
    container = _kubetune_container(spec, options, name=PREPARE_CONTAINER, command=["kubetune"], args=prepare_args(),
                                    env=_prepare_env(cr, spec, namespace=ns, options=options), resources=resources)
    pod_spec = _kubetune_pod(spec, options, names.config_map, container, grace=PREPARE_GRACE_SECONDS)
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec.backoffLimit,
        **_fail_fast_template(PREPARE_CONTAINER, labels_for(cr["kind"], name, "prepare"), pod_spec),
        "suspend": _suspend(cr, spec, suspend),
    }
    job_spec["template"] = customized(job_spec["template"], spec, options.platform_defaults, PREPARE_CONTAINER)
    deadline = active_deadline_seconds if active_deadline_seconds is not None else spec.activeDeadlineSeconds
    if deadline is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(deadline))
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(cr, job_name, "prepare", ns), "spec": job_spec}
    return with_propagated(cr, job)


def render_training(
    cr: dict[str, Any],
    *,
    attempt: int = 1,
    namespace: str | None = None,
    options: RenderOptions | None = None,
    references: dict[str, str] | None = None,
    active_deadline_seconds: int | None = None,
) -> list[dict[str, Any]]:
    """Every child of a training resource for one attempt: ConfigMap, Service, the PodGroup
    (with `spec.gang`), Job."""
    spec = validate_spec(cr["kind"], cr.get("spec"))
    group = render_pod_group(cr, spec, namespace=namespace)
    return [
        render_config_map(cr, spec, namespace=namespace, references=references),
        render_service(cr, namespace=namespace, options=options),
        *([group] if group else []),
        render_job(
            cr, spec, attempt=attempt, namespace=namespace, options=options,
            active_deadline_seconds=active_deadline_seconds,
        ),
    ]


def _kubetune_container(spec: ClusterFields, options: RenderOptions, *, name: str, command: list[str], args: list[str],
                        env: list[dict[str, Any]], resources: dict[str, Any],
                        mounts: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A container of the trainer image: the job's spec mounted read-only, writable scratch
    (/tmp, /cache, /workspace) on emptyDirs so the root filesystem can stay read-only, non-root,
    no privilege escalation, no capabilities."""
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image or options.default_image,
        "command": command,
        "args": args,
        "workingDir": "/workspace",
        "env": env,
        "volumeMounts": [
            {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
            *mounts,
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "workspace", "mountPath": "/workspace"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": spec.readOnlyRootFilesystem,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if resources:
        container["resources"] = resources
    if spec.imagePullPolicy:
        container["imagePullPolicy"] = spec.imagePullPolicy
    return container


def _kubetune_pod(spec: ClusterFields, options: RenderOptions, config_map: str, container: dict[str, Any], *,
                  grace: int, volumes: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The pod around `_kubetune_container`: its volumes, the pod security context and the job's
    placement (service account, priority, node selector, tolerations, affinity)."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": pod_security_context(options.run_as_user),
        "containers": [container],
        "volumes": [
            {"name": "job-config", "configMap": {"name": config_map}},
            *volumes,
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "workspace", "emptyDir": {}},
        ],
    }
    pod_spec.update(scheduling_fields(spec))
    return pod_spec


def _fail_fast_template(container: str, labels: dict[str, str], pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The Job's pod template, and a podFailurePolicy that ends the attempt at once, with the
    cause in the Job's Failed condition (reason PodFailurePolicy, the rule's index in its
    message): rule 0, `container` exited with the trainer's configuration-error code (a retry
    cannot fix a bad spec); rule 1, a pod was disrupted (preemption, eviction, node drain: the
    `DisruptionTarget` condition), which the operator restarts without counting it as a failure."""
    return {
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": container, "operator": "In", "values": [CONFIG_ERROR_EXIT_CODE]},
                },
                {"action": "FailJob", "onPodConditions": [{"type": DISRUPTION_CONDITION, "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {"labels": labels, "annotations": {"kubectl.kubernetes.io/default-container": container}},
            "spec": pod_spec,
        },
    }
