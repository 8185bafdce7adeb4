"""A spec document, parsed: a bare training spec or a kubetune custom resource (reading the file is
`kubetune.trainer.cli.specfiles`'s job; this module does no I/O).

`kubetune train job.yaml` accepts exactly what `kubectl apply -f job.yaml` accepts. For a
`FineTuneJob`/`AlignmentJob` manifest the training spec is `spec.training`; the cluster fields
beside it (nodes, GPUs, image, ...) are the operator's business and are ignored locally.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.trainer.api.errors import (
    SpecError,
    SpecErrors,
    cap_message,
    shorten,
    validation_error_to_spec_errors,
)
from kubetune.trainer.api.spec import TrainingSpec

API_GROUP = "kubetune.io"
REFERENCE_SCHEME = "kubetune-ref://"
"""`model.path` of an AlignmentJob whose base model is another job's output (`baseModelFrom`)."""
JOB_KINDS = ("FineTuneJob", "AlignmentJob")
RESOURCE_KINDS = (*JOB_KINDS, "InferenceService")
MANIFEST_ROOT_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
"""The top-level fields of a custom resource. `kubectl apply` (strict field validation) refuses
any other, so `kubetune train` / `kubetune validate` and the operator refuse them too."""


def is_manifest(document: Any) -> bool:
    """Whether a parsed document is a Kubernetes manifest rather than a bare training spec."""
    return isinstance(document, dict) and ("apiVersion" in document or "kind" in document)


def manifest_root_errors(document: dict[str, Any]) -> list[SpecError]:
    """One error per unknown top-level field of a manifest (a typo such as `sepc`, or a training
    field put beside `spec` instead of under `spec.training`)."""
    errors = []
    for key in document:
        if key not in MANIFEST_ROOT_FIELDS:
            name = cap_message(str(key), 100)
            guess = difflib.get_close_matches(str(key), MANIFEST_ROOT_FIELDS, n=1)
            hint = f"did you mean `{guess[0]}`? " if guess else ""
            errors.append(SpecError(name, "unknown field at the top of the manifest (kubectl apply refuses it).",
                                    f"{hint}a manifest has only {', '.join(MANIFEST_ROOT_FIELDS)}; "
                                    "cluster and training settings go under spec."))
    return errors


def extract_training(document: Any, source: str) -> tuple[dict[str, Any], str | None, str]:
    """Return (training spec dict, kind or None, field prefix) from a parsed document."""
    if not isinstance(document, dict):
        raise SpecError(source, "must be a YAML mapping (a spec or a kubetune manifest).")
    if not is_manifest(document):
        return document, None, ""
    api_version = document.get("apiVersion")
    kind = document.get("kind")
    if not (isinstance(api_version, str) and api_version.split("/")[0] == API_GROUP):
        raise SpecError(
            "apiVersion",
            f"{shorten(api_version)} is not a kubetune resource.",
            f"use apiVersion {API_GROUP}/v1alpha1 with kind FineTuneJob or AlignmentJob, "
            "or pass a bare training spec.",
        )
    if kind not in JOB_KINDS:
        fix = (f"use one of {', '.join(JOB_KINDS)}"
               + (" (`kubetune validate` checks an InferenceService)." if kind in RESOURCE_KINDS else "."))
        raise SpecError("kind", f"{shorten(kind)} cannot be trained.", fix)
    root = manifest_root_errors(document)
    if root:
        raise SpecErrors(root, source)
    spec = document.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), dict):
        raise SpecError("spec.training", "is required but missing.", "put the training spec under spec.training.")
    training = dict(spec["training"])
    reference = spec.get("baseModelFrom")
    model = training.get("model")
    if kind == "AlignmentJob" and isinstance(reference, dict) and (not isinstance(model, dict) or "path" not in model):
        # The operator fills model.path from the referenced job's output when it starts; until
        # then the spec is valid with a reference that only `kubetune train` refuses to load.
        ref_kind, ref_name = next(iter(reference.items()), ("job", "?"))
        training["model"] = {**(model if isinstance(model, dict) else {}), "path": f"{REFERENCE_SCHEME}{ref_kind}/{ref_name}"}
    reward_reference = spec.get("rewardModelFrom")
    reward = training.get("reward")
    if kind == "AlignmentJob" and isinstance(reward_reference, dict) and (not isinstance(reward, dict) or not reward.get("model")):
        ref_kind, ref_name = next(iter(reward_reference.items()), ("job", "?"))
        training["reward"] = {**(reward if isinstance(reward, dict) else {}), "model": f"{REFERENCE_SCHEME}{ref_kind}/{ref_name}"}
    name = (document.get("metadata") or {}).get("name")
    if name and "name" not in training:
        training["name"] = name
    return training, kind, "spec.training"


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """`train.maxSteps=10` -> (['train', 'maxSteps'], 10). Values are parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError("--set", f"{item!r} is not key=value.", "write e.g. --set train.learningRate=1e-4.")
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `--set` overrides in order (dotted paths; integers index lists)."""
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                if not isinstance(part, int) or part > len(node):
                    raise SpecError(f"--set {item}", f"index {part} is out of range.")
                if part == len(node):  # one past the end appends a new item
                    node.append([] if isinstance(nxt, int) else {})
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise SpecError(f"--set {item}", f"{part!r} is inside a value that is not a mapping.")
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last > len(node):
                raise SpecError(f"--set {item}", f"index {last} is out of range.")
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise SpecError(f"--set {item}", "its parent is not a mapping.")
    return data


def validate_training(data: Any, source: str = "", prefix: str = "") -> TrainingSpec:
    """Validate a training-spec dict, raising SpecErrors with field paths on failure."""
    if not isinstance(data, dict):
        raise SpecError(prefix or "(spec)", "must be a mapping of training settings.")
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecErrors(validation_error_to_spec_errors(exc, TrainingSpec, prefix), source) from None
