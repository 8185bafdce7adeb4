"""Semantic validation of the custom resources, shared by the admission webhook and the
reconciler, worded exactly like `kubetune validate` (field path, problem, fix)."""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import ValidationError

from kubetune.operator.resources import KINDS, ClusterFields, InferenceServiceSpec, validate_spec
from kubetune.operator.training.render import training_hash
from kubetune.trainer.api.errors import (
    EXIT_CONFIG_ERROR,
    KubetuneError,
    SpecError,
    SpecErrors,
    cap_message,
    shorten,
    validation_error_to_spec_errors,
)
from kubetune.trainer.api.specfile import manifest_root_errors
from kubetune.trainer.api.uri import looks_like_local_path

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
"""Environment variable names that usually hold a secret."""

try:  # the storage layer knows what an s3:// location is; keep working without it
    from kubetune.trainer.api.uri import is_s3
except ImportError:  # pragma: no cover
    def is_s3(location: object) -> bool:
        return isinstance(location, str) and location.startswith("s3://")


def source_of(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{body.get('kind', 'resource')} {where}{meta.get('name', '?')}"


def validate_resource(body: dict[str, Any], source: str | None = None) -> ClusterFields:
    """Validate a resource of any kind the operator serves: its top-level fields, its spec
    (the kind's model: types, bounds, the depth of free-form objects) and, for the training
    kinds, that every dataset is somewhere a pod can read. Raises SpecErrors naming
    `spec.<field>`. The webhook, the reconcilers and `kubetune validate` all call this."""
    source = source or source_of(body)
    kind = body.get("kind")
    if kind not in KINDS:
        raise SpecErrors([SpecError("kind", f"{shorten(kind)} is not served by this operator.",
                                    f"use one of {', '.join(KINDS)}.")], source)
    root = manifest_root_errors(body)
    if root:
        raise SpecErrors(root, source)
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise SpecErrors([SpecError("spec", "is required but missing.", "add a spec block.")], source)
    try:
        validated = validate_spec(kind, spec)
    except ValidationError as exc:
        raise SpecErrors(validation_error_to_spec_errors(exc, KINDS[kind].spec_model, "spec"), source) from None
    unreachable = pod_invisible_data(validated) + pod_template_conflicts(body, validated)
    if unreachable:
        raise SpecErrors(unreachable, source)
    return validated


def pod_template_conflicts(body: dict[str, Any], spec: Any) -> list[SpecError]:
    """`spec.podTemplate` entries that collide with what kubetune renders into the same pods
    (a label, volume, mount path, variable or container name of its own): kubetune's win, so
    the override is refused here rather than silently dropped. Checked against the pods
    rendered without the override (pure rendering, default operator options)."""
    from kubetune.operator.overrides import apply_pod_template
    from kubetune.operator.resources import PodTemplate

    if spec.podTemplate == PodTemplate():
        return []
    cr = {**body, "metadata": {**(body.get("metadata") or {}), "name": (body.get("metadata") or {}).get("name") or "x"}}
    bare = spec.model_copy(update={"podTemplate": PodTemplate()})
    seen: dict[str, SpecError] = {}
    for template, main in _bare_templates(cr, bare):
        _, conflicts = apply_pod_template(template, spec.podTemplate, main, {e.name for e in spec.env})
        for c in conflicts:
            seen.setdefault(c.field, SpecError(f"spec.podTemplate.{c.field}", c.problem, c.fix))
    return list(seen.values())


PROBE_TRAINING = {"model": {"path": "s3://probe/model"}, "data": {"datasets": [{"path": "s3://probe/data.jsonl"}]},
                  "output": {"path": "s3://probe/out"}}
"""A minimal training spec: the pods a platform default is checked against."""


def platform_default_conflicts(defaults: Any) -> list[SpecError]:
    """Where the platform's pod template collides with kubetune's own pods (a training pod,
    the prepare step's, a server's): those defaults would never apply, so the operator refuses
    to start with them (`--platform-defaults`) rather than drop them without a word."""
    seen: dict[str, SpecError] = {}
    template = defaults.podTemplate.model_dump(mode="json", exclude_none=True)
    probes = [("FineTuneJob", {"training": PROBE_TRAINING}), ("InferenceService", {"model": {"uri": "s3://probe/model"}})]
    for kind, spec in probes:
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "metadata": {"name": "probe"},
                "spec": {**spec, "podTemplate": template}}
        for error in pod_template_conflicts(body, validate_spec(kind, body["spec"])):
            field = error.field.replace("spec.podTemplate.", "platformDefaults.podTemplate.", 1)
            seen.setdefault(field, SpecError(field, error.problem, error.fix))
    return list(seen.values())


def _bare_templates(cr: dict[str, Any], spec: Any) -> list[tuple[dict[str, Any], str]]:
    """(pod template, main container) of every pod shape a resource renders."""
    from kubetune.operator.training import render as training

    if cr.get("kind") == "InferenceService":
        from kubetune.operator.serving import render as serving

        ref = "kubetune-ref://model"
        models = serving.ResolvedModels(spec.model.uri or ref, {a.name: a.uri or ref for a in spec.adapters})
        return [(serving.render_deployment(cr, spec, models)["spec"]["template"], serving.SERVER)]
    return [(training.render_job(cr, spec, attempt=1)["spec"]["template"], training.CONTAINER),
            (training.render_prepare_job(cr, spec)["spec"]["template"], training.PREPARE_CONTAINER)]


def dataset_fields(training: Any) -> list[tuple[str, Any]]:
    """(field path, DatasetSpec) of every dataset a training spec reads, pipeline steps included."""
    out: list[tuple[str, Any]] = []

    def add(prefix: str, data: Any, evaluation: Any) -> None:
        for block, items in (("data.datasets", getattr(data, "datasets", None) or []),
                             ("data.evalDatasets", getattr(data, "evalDatasets", None) or []),
                             ("eval.datasets", getattr(evaluation, "datasets", None) or [])):
            out.extend((f"{prefix}{block}[{i}].path", item) for i, item in enumerate(items))

    add("spec.training.", training.data, training.eval)
    for j, step in enumerate(training.pipeline or []):
        add(f"spec.training.pipeline[{j}].", step.data, step.eval)
    return out


def is_pod_local(path: str) -> bool:
    """Whether a dataset path names a file on the machine that reads it rather than an `s3://`
    location or a hub dataset id (`kubetune validate`'s own rule, `looks_like_local_path`).
    Judged from the text only: the operator's own disk says nothing about the pod's."""
    if path.startswith("file:"):
        return True
    return not (is_s3(path) or "://" in path) and looks_like_local_path(path)


def pod_invisible_data(spec: ClusterFields) -> list[SpecError]:
    """Datasets a training pod cannot see. A pod starts with an empty /workspace; nothing of the
    machine that ran `kubectl apply` (nor the repository's examples/data) is in the image, and
    the training kinds mount no volume of the user's: data must be in S3 (or on the hub). The
    same spec keeps working with `kubetune train`, which reads local files."""
    training = getattr(spec, "training", None)
    if training is None:
        return []
    return [
        SpecError(field, f"{shorten(item.path, 120)} is a local path, which a training pod cannot read "
                  "(it starts with an empty /workspace).",
                  "upload the file to S3 (`kubetune storage cp FILE s3://BUCKET/...`) and use the s3:// URI, or "
                  "name a hub dataset id; local paths are for `kubetune train` on this machine.")
        for field, item in dataset_fields(training) if is_pod_local(item.path)
    ]


GPU_MEMORY_ENV = "KUBETUNE_GPU_MEMORY_GIB"
"""Where `kubetune validate` finds the cluster's default GPU memory (what the operator gets from
`--gpu-memory-gib`), to apply the admission check a cluster applies."""


def default_gpu_memory(configured: float | None = None) -> float | None:
    """The default GPU memory for jobs without `spec.gpuMemoryGiB`: the operator's
    `--gpu-memory-gib` (passed in), else `$KUBETUNE_GPU_MEMORY_GIB` (for `kubetune validate`)."""
    if configured:
        return configured
    raw = os.environ.get(GPU_MEMORY_ENV, "").strip()
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def _memory_inputs(spec: ClusterFields, default_gib: float | None = None) -> tuple[Any, float, Any] | None:
    """(training spec, GPU GiB, model shape) when the memory check applies and can run."""
    from kubetune.trainer.artifacts.model_shape import resolve_shape

    training = getattr(spec, "training", None)
    if training is None or spec.gpusPerNode == 0:
        return None
    gpu_gib = spec.gpuMemoryGiB or default_gpu_memory(default_gib)
    if gpu_gib is None:
        return None
    try:
        # Only what the manifest says: a local path is on the pod's disk, not the operator's.
        shape = resolve_shape(training.model.path, spec.modelParameters, read_local=False)
    except ValueError:
        return None
    return (training, gpu_gib, shape) if shape is not None else None


def memory_refusal(spec: ClusterFields, body: dict[str, Any] | None = None, source: str | None = None,
                   default_gib: float | None = None) -> str | None:
    """Why the job cannot fit in GPU memory on nodes x gpusPerNode (with what would), or None
    when it fits or cannot be checked (no GPU memory known, model size unknown)."""
    from kubetune.trainer.api.estimate import estimate, fit_message

    if isinstance(spec, InferenceServiceSpec):
        return serving_memory_refusal(spec, body, source, default_gib)
    inputs = _memory_inputs(spec, default_gib)
    if inputs is None:
        return None
    training, gpu_gib, shape = inputs
    est = estimate(training, nodes=spec.nodes, gpus_per_node=spec.gpusPerNode, shape=shape)
    if est.fits(gpu_gib):
        return None
    where = f"{source or source_of(body)}: " if (source or body) else ""
    memory = "spec.gpuMemoryGiB" if spec.gpuMemoryGiB else f"the operator's default, --gpu-memory-gib / ${GPU_MEMORY_ENV}"
    return (
        f"{where}spec.training does not fit in GPU memory ({memory}): "
        + fit_message(training, nodes=spec.nodes, gpus_per_node=spec.gpusPerNode, gpu_gib=gpu_gib, shape=shape, est=est)
        + " See `kubetune estimate` for the breakdown."
    )


QUANTIZED_NAME = re.compile(r"awq|gptq|gguf|aqlm|exl2|marlin|bnb|nf4|int4|int8|4bit|8bit|fp8|w4a16|w8a8", re.IGNORECASE)
"""Words in a model's location that mark a pre-quantized checkpoint: its weights' width is not
known from the location alone (vLLM reads it from the checkpoint), so the memory check waits for
`engineArgs.quantization` rather than assume 16-bit weights and refuse a model that fits."""


def serving_shape(spec: InferenceServiceSpec, job: dict[str, Any] | None = None) -> Any:
    """The served model's shape from what the manifest says: `model.uri` (a known architecture
    in its name) or `modelParameters`; for a model `fromJob`, that job's base model (the
    reconciler passes the job it observed; the webhook has none). None when unknown."""
    from kubetune.trainer.artifacts.model_shape import resolve_shape

    params, location = spec.modelParameters, spec.model.uri
    if location is None:
        job_spec = (job or {}).get("spec") or {}
        location = ((job_spec.get("training") or {}).get("model") or {}).get("path") or ""
        params = params or job_spec.get("modelParameters")
    if not location and params is None:
        return None
    try:
        return resolve_shape(location, params, read_local=False)
    except ValueError:
        return None


def serving_memory_estimate(spec: InferenceServiceSpec, shape: Any, gpu_gib: float) -> Any:
    """The serving estimate of one replica (None when the weights' width is unknown: a
    pre-quantized checkpoint without engineArgs.quantization, or an unlisted method). The
    transformers engine runs on one GPU and reserves nothing ahead."""
    from kubetune.trainer.api.serve_estimate import extra_args_settings, serving_estimate

    args = spec.engineArgs
    if args.quantization is None and QUANTIZED_NAME.search(spec.model.uri or ""):
        return None
    vllm = spec.engine == "vllm"
    return serving_estimate(shape, gpu_gib=gpu_gib, tensor_parallel=(spec.tensorParallelSize or spec.gpus) if vllm else 1,
                            dtype=args.dtype, quantization=args.quantization, max_model_len=args.maxModelLen,
                            utilization=args.gpuMemoryUtilization if vllm else 1.0,
                            **(extra_args_settings(args.extraArgs) if vllm else {}))


def serving_memory_refusal(spec: InferenceServiceSpec, body: dict[str, Any] | None = None, source: str | None = None,
                           default_gib: float | None = None, job: dict[str, Any] | None = None,
                           est: Any = None) -> str | None:
    """Why one replica cannot start in GPU memory (with what would), or None when it can or
    cannot be checked (no GPU memory known, model size or weight width unknown). `est`: the
    replica's estimate when the caller has made it already (the console shows it too)."""
    from kubetune.trainer.api.serve_estimate import serving_fit_message

    if est is None:
        gpu_gib = spec.gpuMemoryGiB or default_gpu_memory(default_gib)
        shape = serving_shape(spec, job) if spec.gpus > 0 and gpu_gib else None
        est = serving_memory_estimate(spec, shape, gpu_gib) if shape is not None and gpu_gib else None
    if est is None or est.fits:
        return None
    where = f"{source or source_of(body)}: " if (source or body) else ""
    memory = "spec.gpuMemoryGiB" if spec.gpuMemoryGiB else f"the operator's default, --gpu-memory-gib / ${GPU_MEMORY_ENV}"
    message = serving_fit_message(est, gpus=spec.gpus, parallel=spec.engine == "vllm")
    return (f"{where}the model cannot start in GPU memory ({memory}) with engine {spec.engine}: {message} "
            "See `kubetune estimate` for the breakdown.")


def serving_unchecked_warning(spec: InferenceServiceSpec, default_gib: float | None = None) -> list[str]:
    """Why an InferenceService's memory was not checked although the GPU memory is known."""
    if spec.gpus == 0 or spec.model.uri is None or not (spec.gpuMemoryGiB or default_gpu_memory(default_gib)):
        return []
    if spec.engineArgs.quantization is None and QUANTIZED_NAME.search(spec.model.uri):
        return [f"the GPU memory needed was not checked: {spec.model.uri!r} looks pre-quantized; set "
                "spec.engineArgs.quantization (e.g. awq) to have a model that cannot start refused before it is scheduled."]
    if serving_shape(spec) is None:
        return [f"the GPU memory needed was not checked: the size of {spec.model.uri!r} is unknown; set "
                "spec.modelParameters (e.g. 8B) to have a model that cannot start refused before it is scheduled."]
    return []


def literal_secret_warnings(spec: Any) -> list[str]:
    """spec.env entries with a literal value under a name that usually holds a secret. Literal
    values are stored in plain text in the resource, and the training kinds copy them into the
    job's ConfigMap too (readable by whoever may read ConfigMaps): secrets belong in valueFrom."""
    return [
        f"spec.env[{i}] ({cap_message(var.name, 80)}) has a literal value: it is stored in plain text in this "
        "resource (and, for a training job, in its ConfigMap). Put secrets in a Secret and use "
        "valueFrom: {secretKeyRef: {name: ..., key: ...}}."
        for i, var in enumerate(getattr(spec, "env", None) or [])
        if var.value and SECRET_NAME.search(var.name)
    ]


def warnings_for(spec: ClusterFields, default_gib: float | None = None) -> list[str]:
    """Things that are allowed but probably not what the user wants."""
    from kubetune.operator.overrides import privileged_warnings

    out = literal_secret_warnings(spec) + privileged_warnings(spec.podTemplate)
    if isinstance(spec, InferenceServiceSpec):
        out += serving_unchecked_warning(spec, default_gib)
    training = getattr(spec, "training", None)
    if (
        training is not None
        and spec.gpusPerNode > 0
        and (spec.gpuMemoryGiB or default_gpu_memory(default_gib))
        and _memory_inputs(spec, default_gib) is None
    ):
        out.append(
            f"the GPU memory needed was not checked: the size of {training.model.path!r} is unknown; "
            "set spec.modelParameters (e.g. 7B) to have a job that cannot fit refused before it is scheduled."
        )
    if training is not None:
        output = training.output.path
        if not output or not (is_s3(output) or on_mounted_volume(spec, output)):
            out.append(
                f"spec.training.output.path {output!r} is not an s3:// location: outputs stay on the "
                "pods' ephemeral disk and are lost when the pods end."
            )
    return out


def on_mounted_volume(spec: ClusterFields, path: str) -> bool:
    """Whether a pod path (relative: below the pods' working directory, /workspace) is on a
    volume spec.podTemplate mounts into the trainer (e.g. a shared file system's claim)."""
    import posixpath

    where = posixpath.normpath(posixpath.join("/workspace", path))
    mounts = [m.mountPath.rstrip("/") for m in spec.podTemplate.container.volumeMounts]
    return any(where == m or where.startswith(m + "/") for m in mounts)


def immutable_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """The refusal message when an update changes spec.training of a job that has started."""
    if not old or not (old.get("status") or {}).get("trainingHash"):
        return None
    old_training = (old.get("spec") or {}).get("training")
    new_training = (new.get("spec") or {}).get("training")
    if training_hash(old_training) == training_hash(new_training):
        return None
    return (
        f"{source_of(new)}: spec.training cannot change after the job has started (attempt "
        f"{(old.get('status') or {}).get('attempts') or 1} is running with the original spec). "
        "Fix: revert the change, or create a new job with the new training spec."
    )


class AdmissionRefused(KubetuneError):
    """The admission webhook refuses the request with this message (`kubetune validate` exits 2
    with it). The message is capped: it may echo spec values of any size."""

    exit_code = EXIT_CONFIG_ERROR

    def __init__(self, message: str):
        super().__init__(cap_message(message))


def admit(operation: str | None, old: dict[str, Any] | None, new: dict[str, Any], source: str | None = None,
          default_gib: float | None = None) -> list[str]:
    """The validating webhook's decision, and `kubetune validate`'s for a manifest of any kind
    (with `source`, the file, naming where): the warnings to return, or AdmissionRefused with
    the message `kubectl apply` shows. `default_gib`: the operator's `--gpu-memory-gib`."""
    if operation == "UPDATE" and old and old.get("spec") == new.get("spec"):
        return []  # metadata-only changes (labels, kopf's annotations) are always fine
    try:
        spec = validate_resource(new, source)
    except SpecErrors as exc:
        raise AdmissionRefused(str(exc)) from None
    if operation == "UPDATE":
        refusal = immutable_change(old, new)
        if refusal:
            raise AdmissionRefused(refusal)
    started = bool(((old or {}).get("status") or {}).get("trainingHash"))
    if not started:  # a running job keeps running; what it trains cannot change anyway
        refusal = memory_refusal(spec, new, source, default_gib)
        if refusal:
            raise AdmissionRefused(refusal)
    return warnings_for(spec, default_gib)


# -- hostPath model caches (InferenceService) ------------------------------------------------

HOST_CACHE_FORBIDDEN = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
                        "/run", "/sbin", "/srv", "/sys", "/usr", "/var", "/var/lib", "/var/lib/kubelet",
                        "/var/lib/docker", "/var/lib/containerd", "/var/run", "/var/log", "/tmp")
"""Node directories that must never be, or be below (the last five), the hostPath cache root."""


def check_host_cache_root(root: str) -> str:
    """The operator's hostPath cache root (`--host-cache-root`), normalised; ValueError when it
    is not an absolute, normalised path of its own. Resources only name a sub-directory of it
    (`cache.subPath`, one segment, enforced by the InferenceService schema), so this root bounds
    every directory of the node an InferenceService pod can mount and have chowned."""
    import posixpath

    if not root.startswith("/") or posixpath.normpath(root) != root.rstrip("/") or "//" in root:
        raise ValueError(f"the hostPath cache root {root!r} must be an absolute, normalised path (e.g. /var/lib/kubetune/cache)")
    root = root.rstrip("/") or "/"
    nested = ("/var/lib/kubelet", "/var/lib/docker", "/var/lib/containerd", "/var/run", "/run", "/proc", "/sys",
              "/dev", "/etc", "/root", "/boot")
    if root in HOST_CACHE_FORBIDDEN or any(root.startswith(p + "/") for p in nested):
        raise ValueError(f"the hostPath cache root {root!r} is a system directory of the node; use a directory "
                         "of its own, e.g. /var/lib/kubetune/cache")
    return root
