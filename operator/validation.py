"""Semantic validation of the custom resources, shared by the admission webhook and the
reconciler, worded exactly like `kubetune validate` (field path, problem, fix)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from kubetune.operator.render.training import training_hash
from kubetune.operator.resources import KINDS, ClusterFields, validate_spec
from kubetune.trainer.errors import SpecError, SpecErrors, validation_error_to_spec_errors

try:  # the storage layer knows what an s3:// location is; keep working without it
    from kubetune.trainer.storage.uri import is_s3
except ImportError:  # pragma: no cover
    def is_s3(location: object) -> bool:
        return isinstance(location, str) and location.startswith("s3://")


def source_of(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{body.get('kind', 'resource')} {where}{meta.get('name', '?')}"


def validate_resource(body: dict[str, Any]) -> ClusterFields:
    """Validate a training resource's spec; raises SpecErrors naming `spec.<field>`."""
    kind = body.get("kind")
    if kind not in KINDS:
        raise SpecErrors([SpecError("kind", f"{kind!r} is not served by this operator.")], source_of(body))
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise SpecErrors([SpecError("spec", "is required but missing.", "add a spec with a training block.")], source_of(body))
    try:
        return validate_spec(kind, spec)
    except ValidationError as exc:
        raise SpecErrors(validation_error_to_spec_errors(exc, KINDS[kind].spec_model, "spec"), source_of(body)) from None


GPU_MEMORY_ENV = "KUBETUNE_GPU_MEMORY_GIB"
"""The operator's default GPU memory for jobs without `spec.gpuMemoryGiB` (`--gpu-memory-gib`)."""


def default_gpu_memory() -> float | None:
    raw = os.environ.get(GPU_MEMORY_ENV, "").strip()
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def _memory_inputs(spec: ClusterFields) -> tuple[Any, float, Any] | None:
    """(training spec, GPU GiB, model shape) when the memory check applies and can run."""
    from kubetune.trainer.estimate import resolve_shape

    training = getattr(spec, "training", None)
    if training is None or spec.gpusPerNode == 0:
        return None
    gpu_gib = spec.gpuMemoryGiB or default_gpu_memory()
    if gpu_gib is None:
        return None
    try:
        # Only what the manifest says: a local path is on the pod's disk, not the operator's.
        shape = resolve_shape(training.model.path, spec.modelParameters, read_local=False)
    except ValueError:
        return None
    return (training, gpu_gib, shape) if shape is not None else None


def memory_refusal(spec: ClusterFields, body: dict[str, Any] | None = None) -> str | None:
    """Why the job cannot fit in GPU memory on nodes x gpusPerNode (with what would), or None
    when it fits or cannot be checked (no GPU memory known, model size unknown)."""
    from kubetune.trainer.estimate import estimate, fit_message

    inputs = _memory_inputs(spec)
    if inputs is None:
        return None
    training, gpu_gib, shape = inputs
    est = estimate(training, nodes=spec.nodes, gpus_per_node=spec.gpusPerNode, shape=shape)
    if est.fits(gpu_gib):
        return None
    where = f"{source_of(body)}: " if body else ""
    memory = "spec.gpuMemoryGiB" if spec.gpuMemoryGiB else f"the operator's default, ${GPU_MEMORY_ENV}"
    return (
        f"{where}spec.training does not fit in GPU memory ({memory}): "
        + fit_message(training, nodes=spec.nodes, gpus_per_node=spec.gpusPerNode, gpu_gib=gpu_gib, shape=shape, est=est)
        + " See `kubetune estimate` for the breakdown."
    )


def warnings_for(spec: ClusterFields) -> list[str]:
    """Things that are allowed but probably not what the user wants."""
    out = []
    training = getattr(spec, "training", None)
    if (
        training is not None
        and spec.gpusPerNode > 0
        and (spec.gpuMemoryGiB or default_gpu_memory())
        and _memory_inputs(spec) is None
    ):
        out.append(
            f"the GPU memory needed was not checked: the size of {training.model.path!r} is unknown; "
            "set spec.modelParameters (e.g. 7B) to have a job that cannot fit refused before it is scheduled."
        )
    if training is not None:
        output = training.output.path
        if not output or not is_s3(output):
            out.append(
                f"spec.training.output.path {output!r} is not an s3:// location: outputs stay on the "
                "pods' ephemeral disk and are lost when the pods end."
            )
    return out


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


class AdmissionRefused(Exception):
    """The admission webhook refuses the request with this message."""


def admit(operation: str | None, old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The validating webhook's decision: the warnings to return, or AdmissionRefused with the
    message `kubectl apply` shows (the same text `kubetune validate` prints for the spec)."""
    if operation == "UPDATE" and old and old.get("spec") == new.get("spec"):
        return []  # metadata-only changes (labels, kopf's annotations) are always fine
    try:
        spec = validate_resource(new)
    except SpecErrors as exc:
        raise AdmissionRefused(str(exc)) from None
    if operation == "UPDATE":
        refusal = immutable_change(old, new)
        if refusal:
            raise AdmissionRefused(refusal)
    started = bool(((old or {}).get("status") or {}).get("trainingHash"))
    if not started:  # a running job keeps running; what it trains cannot change anyway
        refusal = memory_refusal(spec, new)
        if refusal:
            raise AdmissionRefused(refusal)
    return warnings_for(spec)
