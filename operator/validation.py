"""Semantic validation of the custom resources, shared by the admission webhook and the
reconciler, worded exactly like `kubetune validate` (field path, problem, fix)."""

from __future__ import annotations

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


def warnings_for(spec: ClusterFields) -> list[str]:
    """Things that are allowed but probably not what the user wants."""
    out = []
    training = getattr(spec, "training", None)
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
    return warnings_for(spec)
