"""The custom resources: pydantic models of FineTuneJob, AlignmentJob and InferenceService, and the
kinds' table (`KINDS`); `crdgen.py` generates the CRDs from them.

`spec.training` of both kinds IS the trainer's `TrainingSpec`; beside it sit the cluster fields
(nodes, GPUs, image, scheduling, S3 credentials, retries). The CRDs in `crds/` are generated
from these models (`kubetune crds`, `crdgen.py`), so the API server refuses type errors with the same rules
the trainer applies, and the operator's admission webhook reports semantic errors in the same
words `kubetune validate` uses.

Kubernetes pass-through types (resources, tolerations, affinity, env) are typed only as far as
the operator needs them; the rest is left to the API server's own validation of the pods.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    model_validator,
)

from kubetune.trainer.api import engine_flags
from kubetune.trainer.api import spec as trainer_spec
from kubetune.trainer.api.spec import TrainingSpec

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetune"

ALIGNMENT_STAGES = ("rm", "dpo", "kto", "ppo", "raft", "grpo")
"""Stages an AlignmentJob runs (enforced once the trainer's spec knows them)."""

GPU_RESOURCE = "nvidia.com/gpu"

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = get_args(Phase)
TERMINAL_PHASES = ("Succeeded", "Failed")

Quantity = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]
"""A Kubernetes quantity (`8`, `"64Gi"`, `"500m"`)."""
MAX_OBJECT_DEPTH = 20
"""Deepest nesting accepted in a free-form object (affinity, env valueFrom). Real ones are under
ten levels deep; hundreds pass a schema with preserve-unknown-fields but break whatever walks
them recursively later (rendering, serializing the pod), so they are refused at admission."""


def _object_depth(value: Any, limit: int) -> int:
    """Nesting depth of dicts/lists in `value`, counting at most to `limit` + 1 (iterative:
    the value being measured may be deeper than the interpreter's recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def bounded_depth(value: Any) -> Any:
    if _object_depth(value, MAX_OBJECT_DEPTH) > MAX_OBJECT_DEPTH:
        raise ValueError(f"is nested more than {MAX_OBJECT_DEPTH} levels deep; a Kubernetes object of this "
                         "kind is a few levels deep: check the indentation, or generate it from a smaller value")
    return value


AnyObject = Annotated[
    dict[str, Any],
    AfterValidator(bounded_depth),
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A Kubernetes object passed through as is (validated by the API server where it lands; its
depth is bounded here)."""


class CrModel(BaseModel):
    """Base for the CR models: camelCase names, unknown keys refused, docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------
# Cluster fields


class ResourceRequirements(CrModel):
    """Compute resources of each pod besides the GPUs (those come from `gpusPerNode` on the
    training kinds, `gpus` on an InferenceService)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """E.g. `{cpu: 16, memory: 200Gi, ephemeral-storage: 500Gi}`."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """E.g. `{memory: 200Gi}`."""

    @model_validator(mode="after")
    def _no_gpus_here(self) -> ResourceRequirements:
        for block in (self.requests, self.limits):
            for name in block:
                if name.endswith("/gpu"):
                    raise ValueError(f"{name} is set by gpusPerNode (and gpuResource); remove it from resources")
        return self


class Toleration(CrModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class EnvVar(CrModel):
    """An environment variable (core/v1 EnvVar). A literal `value` is stored in plain text in
    the resource and in the ConfigMap the operator creates: put secrets in `valueFrom`
    (secretKeyRef)."""

    name: str = Field(min_length=1)
    value: str | None = None
    valueFrom: AnyObject | None = None
    """A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."""


class SecretRef(CrModel):
    """A Secret in the resource's namespace holding S3 credentials. Its values reach the pods through
    `secretKeyRef` environment variables; they are never copied into any object."""

    name: str = Field(min_length=1)
    accessKeyIdKey: str = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in the Secret."""
    secretAccessKeyKey: str = "AWS_SECRET_ACCESS_KEY"
    """Key of the secret access key in the Secret."""
    sessionTokenKey: str | None = None
    """Key of an optional session token in the Secret."""


class ClusterStorage(CrModel):
    """How the pods reach S3. Without `secretRef` they use the pod's identity (IRSA, workload
    identity, instance role)."""

    secretRef: SecretRef | None = None
    endpoint: str | None = None
    """S3-compatible endpoint for the pods (`AWS_ENDPOINT_URL_S3`), e.g. `http://minio.minio:9000`;
    `spec.training.storage.endpointUrl` takes precedence when set."""


# -- Pod template overrides (issue 20 item 4): what a platform adds to kubetune's pods. Merged by
# `overrides.py`; kubetune's own fields win, and admission refuses a conflict with them.

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
VOLUME_SOURCES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
    "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath",
    "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume", "projected",
    "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume",
)
"""The volume sources of a core/v1 Volume (Kubernetes 1.37)."""
CAPABILITIES = ("IPC_LOCK", "SYS_NICE", "SYS_RESOURCE", "NET_RAW", "NET_BIND_SERVICE")
"""Capabilities a pod template may add to kubetune's main container (RDMA: IPC_LOCK)."""


def _one_volume(value: dict[str, Any]) -> dict[str, Any]:
    import re

    name = value.get("name")
    if not isinstance(name, str) or not re.match(_DNS_LABEL, name) or len(name) > 63:
        raise ValueError(f"a volume needs a name that is a DNS label (lowercase letters, digits, '-'), not {name!r}")
    sources = [k for k in value if k != "name"]
    unknown = [k for k in sources if k not in VOLUME_SOURCES]
    if unknown:
        raise ValueError(f"volume {name!r}: {', '.join(unknown)} is not a core/v1 volume source "
                         f"(one of {', '.join(VOLUME_SOURCES)})")
    if len(sources) != 1 or not isinstance(value[sources[0]], dict):
        raise ValueError(f"volume {name!r} needs exactly one source object (e.g. persistentVolumeClaim: "
                         "{claimName: ...}), not " + (", ".join(sources) or "none"))
    return value


Volume = Annotated[
    dict[str, Any],
    AfterValidator(bounded_depth),
    AfterValidator(_one_volume),
    WithJsonSchema({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                    "description": "A core/v1 Volume: a name and one volume source (persistentVolumeClaim, nfs, csi, "
                                   "configMap, secret, emptyDir, ...)."}),
]


class VolumeMount(CrModel):
    """A core/v1 VolumeMount."""

    name: str = Field(min_length=1)
    """The volume (from podTemplate.spec.volumes)."""
    mountPath: str = Field(pattern=r"^/")
    readOnly: bool | None = None
    subPath: str | None = None
    subPathExpr: str | None = None
    mountPropagation: Literal["None", "HostToContainer", "Bidirectional"] | None = None
    recursiveReadOnly: Literal["Disabled", "IfPossible", "Enabled"] | None = None


class LocalObjectReference(CrModel):
    """A core/v1 LocalObjectReference (an object in the same namespace)."""

    name: str = Field(min_length=1)


class OptionalReference(LocalObjectReference):
    """A ConfigMap or Secret whose keys become environment variables."""

    optional: bool | None = None


class EnvFromSource(CrModel):
    """A core/v1 EnvFromSource: every key of a ConfigMap or Secret as a variable."""

    prefix: str | None = None
    configMapRef: OptionalReference | None = None
    secretRef: OptionalReference | None = None


class AddCapabilities(CrModel):
    """Capabilities added to the container (every other one stays dropped)."""

    add: list[Literal[CAPABILITIES]] = Field(default_factory=list)  # type: ignore[valid-type]
    """E.g. `[IPC_LOCK]` for RDMA memory registration. Not allowed by the restricted or baseline
    Pod Security Standard (the namespace must allow privileged pods), and for a non-root
    process a capability only reaches the bounding set: the image must grant it to the binary
    (file capabilities) for it to take effect."""


class ContainerSecurity(CrModel):
    """The parts of a container's securityContext an override may set; the rest stays
    kubetune's restricted default (non-root, no privilege escalation, every capability dropped)."""

    capabilities: AddCapabilities = Field(default_factory=AddCapabilities)
    readOnlyRootFilesystem: bool | None = None
    runAsUser: int | None = Field(None, ge=1)
    """Non-root only."""
    runAsGroup: int | None = Field(None, ge=0)


class ContainerOverride(CrModel):
    """Additions to kubetune's main container (the trainer, or the server)."""

    env: list[EnvVar] = Field(default_factory=list)
    """Extra variables; a name kubetune (or spec.env) sets is refused."""
    envFrom: list[EnvFromSource] = Field(default_factory=list)
    volumeMounts: list[VolumeMount] = Field(default_factory=list)
    """Mounts of podTemplate.spec.volumes; a path kubetune mounts is refused."""
    securityContext: ContainerSecurity = Field(default_factory=ContainerSecurity)


class ExtraContainer(CrModel):
    """An init container or sidecar of the pod (a core/v1 Container, the fields a platform
    agent needs). It runs non-root like kubetune's, unless its securityContext says more."""

    name: str = Field(pattern=_DNS_LABEL, max_length=63)
    image: str = Field(min_length=1)
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    workingDir: str | None = None
    env: list[EnvVar] = Field(default_factory=list)
    envFrom: list[EnvFromSource] = Field(default_factory=list)
    ports: list[AnyObject] = Field(default_factory=list)
    """core/v1 ContainerPorts."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of this container (no accelerators)."""
    volumeMounts: list[VolumeMount] = Field(default_factory=list)
    restartPolicy: Literal["Always"] | None = None
    """`Always` in initContainers: a native sidecar (starts before, runs beside the main container)."""
    securityContext: ContainerSecurity = Field(default_factory=ContainerSecurity)
    livenessProbe: AnyObject | None = None
    readinessProbe: AnyObject | None = None
    startupProbe: AnyObject | None = None
    lifecycle: AnyObject | None = None


class PodMetadataOverride(CrModel):
    """Labels and annotations of the pods (e.g. `sidecar.istio.io/inject: "false"`)."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodSpecOverride(CrModel):
    """Pod-level additions."""

    imagePullSecrets: list[LocalObjectReference] = Field(default_factory=list)
    schedulerName: str | None = None
    runtimeClassName: str | None = None
    hostNetwork: bool | None = None
    """Use the node's network (RDMA/RoCE without a CNI for it); kubetune sets dnsPolicy
    ClusterFirstWithHostNet so the gang still resolves its Service. Needs a privileged namespace."""
    volumes: list[Volume] = Field(default_factory=list)
    initContainers: list[ExtraContainer] = Field(default_factory=list)
    """Run before kubetune's own init containers."""
    containers: list[ExtraContainer] = Field(default_factory=list)
    """Sidecars beside kubetune's containers."""


class PodTemplate(CrModel):
    """Additions to the pods kubetune renders: metadata, pod fields, volumes, init containers,
    sidecars, and the main container's env, mounts and capabilities (Kubeflow Trainer's
    podTemplateOverrides, for kubetune's one pod shape). Merged over the platform's defaults
    (the operator's `--platform-defaults`); kubetune's own fields win: a name, path or
    variable kubetune uses is refused at admission."""

    metadata: PodMetadataOverride = Field(default_factory=PodMetadataOverride)
    spec: PodSpecOverride = Field(default_factory=PodSpecOverride)
    container: ContainerOverride = Field(default_factory=ContainerOverride)
    """Applied to the main container (`trainer`, `prepare`, `server`)."""


GANG_SCHEDULER_NAMES = {"coscheduling": "scheduler-plugins-scheduler", "volcano": "volcano"}
"""The schedulerName each gang scheduler answers to by default (scheduler-plugins' chart
installs the coscheduling plugin as a second scheduler of that name; Volcano's is `volcano`)."""


class GangScheduling(CrModel):
    """All-or-nothing placement of the gang by a gang scheduler: kubetune creates a PodGroup
    (minMember = `nodes`, minResources = the gang's GPUs) owned by the resource before the
    Job, and the pods join it and go to that scheduler, which binds all of them or none."""

    scheduler: Literal["coscheduling", "volcano"]
    """`coscheduling`: the scheduler-plugins Coscheduling plugin (PodGroup
    scheduling.x-k8s.io/v1alpha1, pod label `scheduling.x-k8s.io/pod-group`); `volcano`: the
    Volcano scheduler (PodGroup scheduling.volcano.sh/v1beta1, pod annotation
    `scheduling.k8s.io/group-name`)."""
    schedulerName: str | None = Field(None, min_length=1, max_length=253)
    """The pods' schedulerName; default `scheduler-plugins-scheduler` (coscheduling) or
    `volcano`."""
    scheduleTimeoutSeconds: int | None = Field(None, ge=1)
    """coscheduling: how long the PodGroup waits for all its pods to be placeable before the
    waiting ones are rejected and retried (the plugin's default when unset)."""
    queue: str | None = Field(None, min_length=1, max_length=253)
    """volcano: the Volcano Queue of the PodGroup (Volcano's `default` when unset)."""

    @model_validator(mode="after")
    def _fields_of_the_scheduler(self) -> GangScheduling:
        if self.queue is not None and self.scheduler != "volcano":
            raise ValueError("queue is a Volcano setting: set scheduler: volcano, or remove queue")
        if self.scheduleTimeoutSeconds is not None and self.scheduler != "coscheduling":
            raise ValueError("scheduleTimeoutSeconds is a coscheduling setting: set scheduler: coscheduling, "
                             "or remove it")
        return self

    @property
    def pods_scheduler(self) -> str:
        return self.schedulerName or GANG_SCHEDULER_NAMES[self.scheduler]


class ClusterFields(CrModel):
    """Where and how the training runs on the cluster (shared by the training kinds)."""

    nodes: int = Field(1, ge=1, le=1024)
    """Pods (machines) in the gang; each runs one torchrun agent. Indexed Job: parallelism =
    completions = nodes."""
    gpusPerNode: int = Field(1, ge=0, le=64)
    """GPUs requested by each pod; torchrun starts this many processes per pod (at least one)."""
    gpuResource: str = GPU_RESOURCE
    """Extended resource name of the GPUs (e.g. `amd.com/gpu`)."""
    gpuMemoryGiB: float | None = Field(None, gt=0, le=4096)
    """Memory of one GPU in GiB (e.g. 80 for an H100 80GB). With it (or the operator's
    `--gpu-memory-gib` default) a job whose memory estimate (`kubetune estimate`) exceeds it
    on nodes x gpusPerNode is refused, with what would fit."""
    modelParameters: str | None = Field(None, pattern=r"^\s*\d+(\.\d+)?\s*[kKmMbBtT]?\s*$")
    """Parameter count of the base model (e.g. `7B`, `350M`) for the memory estimate, when
    `training.model.path` names no known architecture (a private S3 or hub model)."""
    image: str | None = None
    """Trainer image; default: the operator's `--trainer-image`."""
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Compute resources of each training pod (besides the GPUs, which come from `gpusPerNode`)."""
    shmSize: Quantity | None = None
    """Size limit of `/dev/shm` (a memory emptyDir); default: no limit beyond the pod's memory."""
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: AnyObject | None = None
    """A core/v1 Affinity for the training pods."""
    priorityClassName: str | None = None
    serviceAccountName: str | None = None
    """Service account of the pods (e.g. one annotated for IRSA to reach S3 without a Secret)."""
    storage: ClusterStorage = Field(default_factory=ClusterStorage)
    env: list[EnvVar] = Field(default_factory=list)
    """Extra environment variables for the trainer container (override the operator's defaults).
    Literal values are copied into the job's ConfigMap: give secrets as valueFrom.secretKeyRef."""
    backoffLimit: int = Field(3, ge=0, le=100)
    """Gang restarts after a failure: the whole gang restarts as a new attempt from the last
    complete checkpoint, at most this many times. A configuration error (trainer exit code 2)
    fails the job at once; a pod lost to preemption, eviction or a node drain restarts the gang
    without counting here (`status.failures` counts what does, `status.preemptions` the rest)."""
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    """Wall-clock limit for the whole job, across attempts."""
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    """Delete the finished Job and its pods after this many seconds (the custom resource, its
    status and the outputs stay)."""
    terminationGracePeriodSeconds: int = Field(300, ge=0)
    """Time a pod gets on SIGTERM (preemption, node drain, suspend) to save and upload a checkpoint."""
    readOnlyRootFilesystem: bool = True
    """Run with a read-only root filesystem (writable emptyDirs at /tmp, /cache and /workspace)."""
    suspend: bool = False
    """Suspend the job: its pods are stopped (each saves a checkpoint on SIGTERM); clearing it
    resumes from the last complete checkpoint."""
    podTemplate: PodTemplate = Field(default_factory=PodTemplate)
    """Additions to the training pods (volumes, labels, sidecars, ...): see PodTemplate."""
    gang: GangScheduling | None = None
    """Place the gang all-or-nothing with a gang scheduler (a PodGroup for coscheduling or
    Volcano); without it, Kueue's admission (quota) is the all-or-nothing step."""


# --------------------------------------------------------------------------------------------
# The kinds


class FineTuneJobSpec(ClusterFields):
    """A fine-tuning run on the cluster: the trainer's spec plus where and how it runs."""

    training: TrainingSpec
    """The training spec: exactly what `kubetune train` reads from a file."""


class ModelRef(CrModel):
    """A reference to another job in the same namespace whose output is used as a model."""

    fineTuneJob: str | None = None
    """Name of a FineTuneJob."""
    alignmentJob: str | None = None
    """Name of an AlignmentJob (e.g. the `rm` stage that trained a reward model)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelRef:
        if (self.fineTuneJob is None) == (self.alignmentJob is None):
            raise ValueError("set exactly one of fineTuneJob or alignmentJob")
        return self

    @property
    def kind(self) -> str:
        return "FineTuneJob" if self.fineTuneJob else "AlignmentJob"

    @property
    def name(self) -> str:
        return self.fineTuneJob or self.alignmentJob or ""


BASE_MODEL_PLACEHOLDER = "kubetune-ref://"
"""model.path while an AlignmentJob's base model comes from a reference (replaced at start)."""


def _placeholder(data: Any, reference: str, block: str, key: str) -> Any:
    """`data` (a raw AlignmentJob spec) with `training.<block>.<key>` set to the placeholder when
    `reference` is given and the key is unset."""
    if not isinstance(data, dict) or not data.get(reference):
        return data
    training = data.get("training")
    if not isinstance(training, dict):
        return data
    values = training.get(block) or {}
    if isinstance(values, dict) and values.get(key) is None:
        data = {**data, "training": {**training, block: {**values, key: BASE_MODEL_PLACEHOLDER}}}
    return data


class AlignmentJobSpec(ClusterFields):
    """An alignment stage (rm, dpo, kto, ppo, raft, grpo) on the cluster, usually starting from
    the output of a FineTuneJob (and, for ppo/raft/grpo, scoring with an rm AlignmentJob's output)."""

    training: TrainingSpec
    """The training spec. With `baseModelFrom`, leave `training.model.path` out: the referenced
    job's output is filled in when this job starts."""
    baseModelFrom: ModelRef | None = None
    """Start from the output of this job; this job waits (Pending) until it has Succeeded."""
    rewardModelFrom: ModelRef | None = None
    """Use the output of this job as the reward model (`training.reward.model` of ppo, raft,
    grpo); waited for like `baseModelFrom`."""

    @model_validator(mode="before")
    @classmethod
    def _placeholders_for_references(cls, data: Any) -> Any:
        """With `baseModelFrom` (`rewardModelFrom`), `training.model.path`
        (`training.reward.model`) is filled in when the job starts: until then a placeholder."""
        data = _placeholder(data, "baseModelFrom", "model", "path")
        return _placeholder(data, "rewardModelFrom", "reward", "model")

    @model_validator(mode="after")
    def _alignment_rules(self) -> AlignmentJobSpec:
        if self.baseModelFrom and self.training.model.path != BASE_MODEL_PLACEHOLDER:
            raise ValueError("set either training.model.path or baseModelFrom, not both")
        stages = [s for s in ALIGNMENT_STAGES if s in get_args(trainer_spec.Stage)]
        if stages and self.training.stage not in stages:
            raise ValueError(
                f"an AlignmentJob runs an alignment stage ({', '.join(stages)}), not "
                f"{self.training.stage!r}; use a FineTuneJob for it"
            )
        if self.rewardModelFrom and self.training.reward.model != BASE_MODEL_PLACEHOLDER:
            raise ValueError("set either training.reward.model or rewardModelFrom, not both")
        if self.rewardModelFrom and self.training.stage not in trainer_spec.ROLLOUT_STAGES:
            raise ValueError(f"rewardModelFrom is for the stages that score generations ({', '.join(trainer_spec.ROLLOUT_STAGES)}), "
                             f"not {self.training.stage!r}")
        return self


# --------------------------------------------------------------------------------------------
# InferenceService (issue 8)

_SERVED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A model name clients send (`"model": NAME`): no `/`, `:` or `=` (it is passed as NAME=URI)."""
_LOCATION = engine_flags.LOCATION_PATTERN
"""A model location: no whitespace and no leading `-` (it is an argument of the pod's command)."""


class ModelSource(CrModel):
    """Where a model or adapter comes from: a URI, or the output of a training job."""

    uri: Annotated[str, Field(pattern=_LOCATION)] | None = None
    """An `s3://` prefix holding the model (or a path inside the image)."""
    fromJob: ModelRef | None = None
    """The output of this FineTuneJob/AlignmentJob (same namespace); the service stays Pending
    until that job has Succeeded."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.uri is None) == (self.fromJob is None):
            raise ValueError("set exactly one of uri or fromJob")
        return self


class ServedModel(ModelSource):
    """The base model (a full model, or a LoRA output, served on the base it was trained from)."""

    name: Annotated[str, Field(pattern=_SERVED_NAME, max_length=128)] | None = None
    """The model name clients send; default: the resource's name."""


class AdapterSource(ModelSource):
    """A LoRA adapter served on the same base under its own model name."""

    name: Annotated[str, Field(pattern=_SERVED_NAME, max_length=128)]
    """The model name clients send to use this adapter."""


def _engine_args_model() -> type[CrModel]:
    """`spec.engineArgs`: its fields come from the engine flag table
    (`kubetune.trainer.api.engine_flags`), which also names their `kubetune serve` flags and vLLM
    arguments."""
    fields: dict[str, Any] = {}
    for flag in engine_flags.engine_args_fields():
        if flag.repeated:
            info = Field(default_factory=list, description=flag.description, **flag.constraints)
        else:
            info = Field(flag.default, description=flag.description, **flag.constraints)
        fields[flag.crd] = (flag.type, info)
    return create_model("EngineArgs", __base__=CrModel, __doc__="Engine settings (the `kubetune serve` flags of the "
                        "same names).", __module__=__name__, **fields)


EngineArgs = _engine_args_model()


ScalingMetric = Literal["cpu", "requestsInFlight", "queueDepth"]
SCALING_DEFAULT_TARGETS = {"cpu": 80, "requestsInFlight": 8, "queueDepth": 4}


class Autoscaling(CrModel):
    """How the HorizontalPodAutoscaler scales between minReplicas and maxReplicas."""

    metric: ScalingMetric = "requestsInFlight"
    """cpu (utilization of the CPU request), requestsInFlight (`kubetune_requests_in_flight` per
    pod) or queueDepth (`kubetune_queue_depth` per pod); the last two through the Prometheus
    adapter."""
    target: int | None = Field(None, ge=1)
    """Target per pod: percent for cpu (default 80), requests for requestsInFlight (default 8),
    waiting sequences for queueDepth (default 4)."""
    scaleDownStabilizationSeconds: int = Field(300, ge=0, le=3600)
    """Scale down only after the load has been lower for this long (model pods start slowly)."""
    activationQuery: str | None = Field(None, min_length=1, max_length=2000)
    """With minReplicas 0 (KEDA): a PromQL query that is above 0 while clients want the service,
    seen in front of it (e.g. your gateway's or mesh's request rate to its Service). At zero no
    server runs, so the server's own metrics cannot wake it: without this query (or KEDA's HTTP
    add-on in front) a service at zero stays there."""

    @property
    def effective_target(self) -> int:
        return self.target if self.target is not None else SCALING_DEFAULT_TARGETS[self.metric]


HOST_CACHE_SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""One path segment that cannot be `.`, `..` or absolute and holds no `/`: a hostPath cache's
sub-directory under the operator's root. One segment only, so that no pod can mount a directory
another pod can write into the parent of (a planted symlink there would lead the kubelet
anywhere on the node)."""


class ModelCache(CrModel):
    """Where the init container caches model and adapters. The cache is keyed by each object's
    ETag: a pod that finds the same version there downloads nothing."""

    type: Literal["emptyDir", "hostPath", "pvc"] = "emptyDir"
    """emptyDir: per pod (survives container restarts); hostPath: per node (shared by the
    replicas on a node and by later pods); pvc: a (ReadWriteMany) volume shared by all."""
    subPath: str | None = Field(None, pattern=HOST_CACHE_SEGMENT, max_length=63)
    """hostPath: the name of this service's cache directory (one path segment: letters, digits,
    `.`, `_`, `-`; default `default`). It lives on the node at
    `<operator cache root>/<namespace>/<subPath>`: the root is set by the platform (the operator's
    `--host-cache-root`, Helm `serving.hostPathCacheRoot`), never by the resource."""
    path: str | None = None
    """Not accepted: a resource cannot choose a directory on the node (use subPath)."""
    claimName: str | None = None
    """pvc: the PersistentVolumeClaim in the service's namespace."""
    sizeLimit: Quantity | None = None
    """emptyDir: size limit."""

    @model_validator(mode="after")
    def _fields_of_type(self) -> ModelCache:
        if self.type == "pvc" and not self.claimName:
            raise ValueError("cache type pvc needs claimName")
        if self.type != "pvc" and self.claimName:
            raise ValueError("claimName is only for cache type pvc")
        if self.path is not None:
            raise ValueError(
                f"cache.path {self.path!r} is not accepted: a resource cannot choose a directory on the node. "
                "hostPath caches live under the operator's cache root (--host-cache-root); name this "
                "service's sub-directory with cache.subPath (one segment, e.g. subPath: llama-3)")
        if self.type != "hostPath" and self.subPath:
            raise ValueError("subPath is only for cache type hostPath")
        return self


class InferenceServiceSpec(CrModel):
    """An OpenAI-compatible endpoint: one base model plus LoRA adapters, autoscaled."""

    model: ServedModel
    """The base model: a URI or a training job's output, and the name clients send for it."""
    adapters: list[AdapterSource] = Field(default_factory=list, max_length=64)
    """LoRA adapters on the same base, each served under its own name."""
    engine: Literal["vllm", "transformers"] = "vllm"
    """vllm (vLLM's OpenAI server; the image must contain vLLM) or transformers (`kubetune serve`)."""
    image: str | None = None
    """Server image; default: the operator's image for the engine (vllm: `--vllm-image`, the
    kubetune-vllm image; transformers: `--trainer-image`), or `--server-image` when it is set."""
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Pull policy of the server image."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU, memory and ephemeral storage of each server replica; the GPUs come from `gpus`."""
    gpus: int = Field(1, ge=0, le=64)
    """GPUs per replica."""
    gpuResource: str = GPU_RESOURCE
    """Extended resource name of the GPUs of each replica (e.g. `amd.com/gpu`)."""
    tensorParallelSize: int | None = Field(None, ge=1, le=64)
    """vLLM tensor parallelism (default: gpus)."""
    gpuMemoryGiB: float | None = Field(None, gt=0, le=4096)
    """Memory of one GPU in GiB (e.g. 80 for an H100 80GB). With it (or the operator's
    `--gpu-memory-gib` default) a service whose model cannot start on its GPUs is refused before
    any pod is scheduled: the weights (every expert of a mixture of experts, the vision encoder of
    a vision-language model) over tensorParallelSize GPUs, the engine's activation peak, and KV
    cache for one sequence of maxModelLen tokens (default: the model's context length), with the
    tensorParallelSize or maxModelLen that would start (`kubetune estimate` shows the breakdown)."""
    modelParameters: str | None = Field(None, pattern=r"^\s*\d+(\.\d+)?\s*[kKmMbBtT]?\s*$")
    """Parameter count of the model (e.g. `8B`) for the memory check, when `model.uri` names no
    known architecture (a private S3 model). A model `fromJob` has its job's base model's size."""
    replicas: int | None = Field(None, ge=0)
    """Replicas when autoscaling is off (minReplicas == maxReplicas); `kubectl scale` sets it.
    Default: minReplicas."""
    minReplicas: int = Field(1, ge=0, le=1000)
    """0: scale to zero when idle, through a KEDA ScaledObject (needs KEDA in the cluster and
    maxReplicas); each first request after idling waits for a cold start (model download and load)."""
    maxReplicas: int | None = Field(None, ge=1, le=1000)
    """Above minReplicas: a HorizontalPodAutoscaler scales in between. Default: minReplicas (no
    autoscaling)."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    """What the HorizontalPodAutoscaler scales on (when maxReplicas > minReplicas)."""
    engineArgs: EngineArgs = Field(default_factory=EngineArgs)
    """Settings of the inference engine (context length, dtype, quantization, batching, LoRA)."""
    cache: ModelCache = Field(default_factory=ModelCache)
    port: int = Field(8000, ge=1024, le=65535)
    """Container port of the server (the Service listens on 80)."""
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Type of the Service in front of the replicas."""
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    """Node labels the server pods must run on."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the server pods tolerate (e.g. `nvidia.com/gpu`)."""
    affinity: AnyObject | None = None
    """A core/v1 Affinity for the server pods (e.g. spread replicas across zones)."""
    priorityClassName: str | None = None
    """Priority class of the server pods."""
    serviceAccountName: str | None = None
    """Service account of the server pods (e.g. one annotated for IRSA to fetch models from S3
    without a Secret)."""
    storage: ClusterStorage = Field(default_factory=ClusterStorage)
    """How the pods fetch the model and adapters from S3 (endpoint, credentials)."""
    env: list[EnvVar] = Field(default_factory=list)
    """Extra environment variables of the pod's containers. Every service requires an API key:
    by default one the operator generates into the Secret `<name>-isvc-api-key` (key `api-key`);
    KUBETUNE_API_KEY here (valueFrom a Secret of yours) replaces it, and KUBETUNE_API_KEY with the
    value "" serves without a key (anyone who reaches the Service can load adapters)."""
    shmSize: Quantity | None = None
    """Size limit of `/dev/shm` (vLLM tensor parallelism uses shared memory)."""
    terminationGracePeriodSeconds: int = Field(60, ge=10, le=3600)
    """Time a pod gets to drain in-flight requests when it stops (rollout, scale-down)."""
    startupTimeoutSeconds: int = Field(1800, ge=60, le=14400)
    """How long the server may take to load the model before the pod is restarted (after the
    init container's download)."""
    readOnlyRootFilesystem: bool = True
    """Run the server containers with a read-only root filesystem (writable emptyDirs for caches)."""
    podTemplate: PodTemplate = Field(default_factory=PodTemplate)
    """Additions to the server pods (volumes, labels, sidecars, ...): see PodTemplate."""

    @model_validator(mode="after")
    def _serving_rules(self) -> InferenceServiceSpec:
        if self.maxReplicas is not None and self.maxReplicas < self.minReplicas:
            raise ValueError(f"maxReplicas ({self.maxReplicas}) is below minReplicas ({self.minReplicas})")
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique: {', '.join(duplicates)}")
        if self.model.name and self.model.name in names:
            raise ValueError(f"adapter name {self.model.name!r} is the base model's name")
        if self.engine != "vllm":
            vllm_only = [(f"engineArgs.{flag.crd}", getattr(self.engineArgs, flag.crd)) for flag in engine_flags.vllm_only()]
            for name, value in (("tensorParallelSize", self.tensorParallelSize and self.tensorParallelSize > 1),
                                *vllm_only):
                if value:
                    raise ValueError(f"{name} needs engine vllm")
        if self.tensorParallelSize and self.gpus and self.tensorParallelSize > self.gpus:
            raise ValueError(f"tensorParallelSize ({self.tensorParallelSize}) exceeds gpus ({self.gpus})")
        if self.autoscaled and self.autoscaling.metric == "cpu" and "cpu" not in self.resources.requests:
            raise ValueError("autoscaling on cpu needs resources.requests.cpu (utilization is relative to it)")
        if self.minReplicas == 0 and not self.maxReplicas:
            raise ValueError("minReplicas 0 (scale to zero) needs maxReplicas (at least 1): the most replicas KEDA starts")
        if self.minReplicas == 0 and self.autoscaling.metric == "cpu":
            raise ValueError("minReplicas 0 cannot scale on cpu (no pod, no CPU to measure): use autoscaling.metric "
                             "requestsInFlight or queueDepth")
        if self.autoscaling.activationQuery and self.minReplicas != 0:
            raise ValueError("autoscaling.activationQuery is for minReplicas 0 (KEDA's scale from zero)")
        return self

    @property
    def autoscaled(self) -> bool:
        """An autoscaler (an HPA, or KEDA's for scale to zero) manages the replicas."""
        return self.maxReplicas is not None and self.maxReplicas > self.minReplicas

    @property
    def scales_to_zero(self) -> bool:
        """minReplicas 0: a KEDA ScaledObject, not an HPA, manages the replicas."""
        return self.minReplicas == 0


# --------------------------------------------------------------------------------------------
# Status


class StatusModel(BaseModel):
    """Status blocks: written by the operator only; no defaults (the API server would apply them)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Condition(StatusModel):
    """A standard condition (metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    observedGeneration: int | None = None


class TrainingProgress(StatusModel):
    """Training progress, read from the trainer's status.json in the output location."""

    step: int | None = None
    totalSteps: int | None = None
    percent: float | None = None
    epoch: float | None = None
    loss: float | None = None
    """Latest training loss."""
    evalLoss: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    lastCheckpoint: str | None = None
    """URI of the newest complete checkpoint."""
    state: str | None = None
    """The trainer's own state (e.g. loading, training, saving, done)."""
    updatedAt: str | None = None
    """When the trainer last wrote its status."""
    ignored: list[str] | None = None
    """Fields of the trainer's status.json that were left out (wrong type, out of range, an
    outputUri outside the job's output location): the file is written by user code."""


class TrainingJobStatus(StatusModel):
    """Status of a training kind (FineTuneJob, AlignmentJob)."""

    phase: Phase | None = None
    """Pending, Running, Succeeded, Failed or Suspended."""
    reason: str | None = None
    """A CamelCase reason for the phase."""
    message: str | None = None
    observedGeneration: int | None = None
    attempts: int | None = None
    """Gang attempts started so far: 1 + restarts (after a failure or a disrupted pod). A Kueue
    preemption does not start one: the same attempt resumes when Kueue re-admits it."""
    failures: int | None = None
    """Attempts that failed (a pod failed on its own): what backoffLimit bounds."""
    preemptions: int | None = None
    """Times the job lost its pods to the platform, never counted against backoffLimit: Kueue
    preempted it (its Workload evicted, reason Preempted: the same attempt resumes when
    re-admitted) or a pod was preempted, evicted or drained (DisruptionTarget: the gang restarts
    as the next attempt)."""
    startTime: str | None = None
    completionTime: str | None = None
    jobName: str | None = None
    """The batch/v1 Job of the current attempt."""
    outputUri: str | None = None
    """Where the outputs are (the trainer's output location)."""
    trainingHash: str | None = None
    """Hash of spec.training when the job started: the training spec is immutable afterwards."""
    conditions: list[Condition] | None = None
    progress: TrainingProgress | None = None


class AlignmentJobStatus(TrainingJobStatus):
    """Status of an AlignmentJob."""

    baseModelUri: str | None = None
    """The base model resolved from `baseModelFrom`."""
    rewardModelUri: str | None = None
    """The reward model resolved from `rewardModelFrom`."""


ServingPhase = Literal["Pending", "Deploying", "Ready", "Failed"]
SERVING_PHASES: tuple[str, ...] = get_args(ServingPhase)


class ServedAdapter(StatusModel):
    """An adapter being served."""

    name: str
    uri: str


class InferenceServiceStatus(StatusModel):
    """Status of an InferenceService."""

    phase: ServingPhase | None = None
    """Pending (waiting for a job or Secret), Deploying (no replica ready yet), Ready, Failed."""
    reason: str | None = None
    message: str | None = None
    observedGeneration: int | None = None
    url: str | None = None
    """OpenAI base URL inside the cluster."""
    replicas: int | None = None
    """Pods of the Deployment (the scale subresource's status replicas)."""
    readyReplicas: int | None = None
    updatedReplicas: int | None = None
    desiredReplicas: int | None = None
    """What the autoscaler (or spec.replicas) asks for."""
    selector: str | None = None
    """Label selector of the pods (the scale subresource's selector)."""
    engine: str | None = None
    deploymentName: str | None = None
    model: str | None = None
    """Served name of the base model."""
    modelUri: str | None = None
    """Where the base model comes from (references resolved)."""
    adapters: list[ServedAdapter] | None = None
    servedModels: list[str] | None = None
    """Every model name the endpoint answers to (base first)."""
    apiKeySecret: str | None = None
    """The Secret holding the API key clients must send (`Authorization: Bearer`): the one the
    operator generated (key `api-key`), or the one spec.env's KUBETUNE_API_KEY references. Only its
    name: the key never appears in the status."""
    conditions: list[Condition] | None = None


class KindInfo(BaseModel):
    """Everything about one custom resource kind the operator serves."""

    kind: str
    plural: str
    singular: str
    short_names: list[str]
    spec_model: Any
    status_model: Any
    printer_columns: list[dict[str, Any]]
    description: str
    scale: dict[str, str] | None = None
    """The scale subresource (`kubectl scale`, HPAs), when the kind has one."""

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


_TRAINING_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent of training steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "number", "jsonPath": ".status.progress.etaSeconds",
     "description": "Seconds of training left, as the trainer estimates them."},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.nodes", "priority": 1},
    {"name": "GPUs/Node", "type": "integer", "jsonPath": ".spec.gpusPerNode", "priority": 1},
    {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions", "priority": 1},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

KINDS: dict[str, KindInfo] = {
    "FineTuneJob": KindInfo(
        kind="FineTuneJob",
        plural="finetunejobs",
        singular="finetunejob",
        short_names=["ftj"],
        spec_model=FineTuneJobSpec,
        status_model=TrainingJobStatus,
        printer_columns=_TRAINING_COLUMNS,
        description="A fine-tuning run (pt, sft) on one or more GPU nodes, driven by the kubetune operator.",
    ),
    "AlignmentJob": KindInfo(
        kind="AlignmentJob",
        plural="alignmentjobs",
        singular="alignmentjob",
        short_names=["alj"],
        spec_model=AlignmentJobSpec,
        status_model=AlignmentJobStatus,
        printer_columns=_TRAINING_COLUMNS,
        description="An alignment run (rm, dpo), usually from a FineTuneJob's output.",
    ),
    "InferenceService": KindInfo(
        kind="InferenceService",
        plural="inferenceservices",
        singular="inferenceservice",
        short_names=["kisvc"],  # not `isvc`: that is KServe's
        spec_model=InferenceServiceSpec,
        status_model=InferenceServiceStatus,
        printer_columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
            {"name": "URL", "type": "string", "jsonPath": ".status.url"},
            {"name": "Models", "type": "string", "jsonPath": ".status.servedModels", "priority": 1},
            {"name": "Engine", "type": "string", "jsonPath": ".spec.engine", "priority": 1},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        description="An autoscaled OpenAI-compatible endpoint serving a model and its LoRA adapters "
        "(vLLM or kubetune serve), driven by the kubetune operator.",
        scale={
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    ),
}
TRAINING_KINDS = ("FineTuneJob", "AlignmentJob")


def kind_by_plural(plural: str) -> KindInfo:
    for info in KINDS.values():
        if info.plural == plural:
            return info
    raise KeyError(plural)


def validate_spec(kind: str, spec: Any) -> ClusterFields:
    """Validate a CR's spec with its model; raises pydantic's ValidationError."""
    model = KINDS[kind].spec_model
    return model.model_validate(spec if spec is not None else {})


__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "PHASES",
    "TERMINAL_PHASES",
    "TRAINING_KINDS",
    "VERSION",
    "AlignmentJobSpec",
    "AlignmentJobStatus",
    "Condition",
    "FineTuneJobSpec",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "TrainingJobStatus",
]
