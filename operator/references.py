"""What a resource needs before it starts: its S3 Secret and the training jobs it references.

Shared by the training reconciler (`baseModelFrom`, `rewardModelFrom`) and the serving one
(`model.fromJob`, `adapters[].fromJob`), so both check the same things and say them in the same
words. Pure functions over dicts, except `observe_secret` and `observe_references` (the
reconcilers' I/O shells call them), which read the Secret's metadata and the referenced jobs.

The Secret checked is the *effective* one: the resource's own `spec.storage.secretRef`, else the
operator's default (`--default-s3-secret`), which is what the pods will reference
(`render.common.effective_storage`). Only its existence is checked, never its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.common import StorageDefaults, effective_storage
from kubetune.operator.status import FAILED, READY_TO_START, SUCCEEDED

SECRET_NOT_FOUND = "SecretNotFound"
REFERENCE_NOT_FOUND = "ReferenceNotFound"
REFERENCE_FAILED = "ReferenceFailed"
WAITING_FOR_REFERENCE = "WaitingForReference"


# -- the S3 Secret ---------------------------------------------------------------------------


def secret_to_check(spec: Any, defaults: StorageDefaults | None) -> str | None:
    """The name of the Secret the resource's pods will reference, or None (pod identity)."""
    ref = effective_storage(spec, defaults).secretRef
    return ref.name if ref is not None else None


def observe_secret(kube: Any, namespace: str, spec: Any, defaults: StorageDefaults | None) -> bool | None:
    """Whether that Secret exists (None when there is none to check). Reads metadata only."""
    name = secret_to_check(spec, defaults)
    if name is None:
        return None
    return kube.get("Secret", namespace, name, metadata_only=True) is not None


def missing_secret_message(spec: Any, defaults: StorageDefaults | None, secret_found: bool | None,
                           namespace: str) -> str | None:
    """Why the resource waits for its Secret, or None when it does not."""
    name = secret_to_check(spec, defaults)
    if name is None or secret_found is not False:
        return None
    if spec.storage.secretRef is not None:
        return (f"Secret {name!r} (spec.storage.secretRef) does not exist in namespace {namespace}; "
                "create it with the S3 credentials.")
    return (f"Secret {name!r} (the operator's default S3 Secret, --default-s3-secret) does not exist in namespace "
            f"{namespace}; create it there with the S3 credentials, or set spec.storage.secretRef, or "
            "spec.serviceAccountName to use the pods' identity.")


# -- referenced jobs -------------------------------------------------------------------------


def output_uri_of(body: dict[str, Any]) -> str:
    """Where a training resource's outputs are: the trainer's report, else its spec."""
    status = body.get("status") or {}
    if status.get("outputUri"):
        return status["outputUri"]
    training = (body.get("spec") or {}).get("training") or {}
    name = training.get("name") or (body.get("metadata") or {}).get("name") or "kubetune"
    return (training.get("output") or {}).get("path") or f"outputs/{name}"


@dataclass(frozen=True)
class Wanted:
    """One reference of a resource: `key` (how the observation is filed), `path` (the field, for
    messages: `spec.baseModelFrom`, `spec.adapters[1].fromJob`) and the `ModelRef` itself."""

    key: str
    path: str
    ref: Any

    @property
    def label(self) -> str:
        return f"{self.path}: {self.ref.kind} {self.ref.name!r}"


TRAINING_REFERENCE_FIELDS = ("baseModelFrom", "rewardModelFrom")


def reference_key(ref: Any) -> str:
    return f"{ref.kind}/{ref.name}"


def training_references(spec: Any) -> list[Wanted]:
    """A FineTuneJob's/AlignmentJob's references, filed by field name."""
    return [Wanted(name, f"spec.{name}", getattr(spec, name)) for name in TRAINING_REFERENCE_FIELDS
            if getattr(spec, name, None) is not None]


def service_references(spec: Any) -> list[Wanted]:
    """An InferenceService's references (its model and adapters from jobs), filed by `Kind/name`."""
    out = []
    if spec.model.fromJob is not None:
        out.append(Wanted(reference_key(spec.model.fromJob), "spec.model.fromJob", spec.model.fromJob))
    for i, adapter in enumerate(spec.adapters):
        if adapter.fromJob is not None:
            out.append(Wanted(reference_key(adapter.fromJob), f"spec.adapters[{i}].fromJob", adapter.fromJob))
    return out


def observe_references(kube: Any, namespace: str, wanted: Iterable[Wanted]) -> dict[str, dict[str, Any] | None]:
    """key -> the referenced job (None when it does not exist); each job is read once."""
    observed: dict[str, dict[str, Any] | None] = {}
    for item in wanted:
        if item.key not in observed:
            observed[item.key] = kube.get(item.ref.kind, namespace, item.ref.name)
    return observed


@dataclass(frozen=True)
class Waiting:
    label: str
    phase: str
    """The referenced job's phase and progress, e.g. `Running, 40%`."""


@dataclass
class References:
    """The referenced jobs, checked in order. The walk stops at the first one that does not exist
    or has failed (`reason` and `message` say which); without one, `reason` is
    WaitingForReference while any has not succeeded yet, and None when all are resolved."""

    resolved: dict[str, str] = field(default_factory=dict)
    """key -> the referenced job's output location (its trainer's report, else its spec)."""
    waiting: list[Waiting] = field(default_factory=list)
    reason: str | None = None
    message: str = ""

    def wait_for(self, waiting: Waiting, *, one_at_a_time: bool) -> None:
        self.waiting.append(waiting)
        self.reason = WAITING_FOR_REFERENCE
        if one_at_a_time:
            self.message = f"waiting for {waiting.label} to succeed (now {waiting.phase})."
        else:
            self.message = "waiting for " + "; ".join(f"{w.label} (now {w.phase})" for w in self.waiting) + " to succeed."


def check_references(wanted: Iterable[Wanted], observed: Mapping[str, dict[str, Any] | None], namespace: str,
                     *, first_waiting_blocks: bool = False) -> References:
    """Check each reference against what was observed (`observed[key]`: the job, or None when it
    does not exist). With `first_waiting_blocks`, the walk also stops at the first job that has
    not succeeded (a training job names the one it waits for); otherwise every waiting job is
    listed (a service says all it waits for)."""
    out = References()
    for item in wanted:
        target = observed.get(item.key)
        if target is None:
            out.reason, out.message = REFERENCE_NOT_FOUND, f"{item.label} does not exist in namespace {namespace}."
            return out
        tstatus = target.get("status") or {}
        tphase = tstatus.get("phase")
        if tphase == FAILED:
            out.reason = REFERENCE_FAILED
            out.message = f"{item.label} failed ({tstatus.get('reason') or 'Failed'}): {tstatus.get('message') or ''}".strip()
            return out
        if tphase != SUCCEEDED:
            percent = (tstatus.get("progress") or {}).get("percent")
            phase = f"{tphase or 'Pending'}" + (f", {percent}%" if percent is not None else "")
            out.wait_for(Waiting(item.label, phase), one_at_a_time=first_waiting_blocks)
            if first_waiting_blocks:
                return out
            continue
        out.resolved[item.key] = output_uri_of(target)
    return out


# -- the decision, shared by the reconcilers ---------------------------------------------------


class DependencyChecks:
    """Mixin of the training and serving reconcilers (`StatusDecisions` subclasses): waits for the
    Secret and the referenced jobs. The reconciler provides `options.storage_defaults`,
    `obs.secret_found`, `obs.references`, `namespace`, `condition()`, `blocked(reason, message,
    event_type)` (Pending with DependenciesReady=False) and `reference_failed(message)`."""

    options: Any
    obs: Any
    namespace: str
    condition: Any
    blocked: Any
    reference_failed: Any

    def resolve_dependencies(self, spec: Any, wanted: Iterable[Wanted], *, first_waiting_blocks: bool = False
                             ) -> dict[str, str] | None:
        """key -> output location of every referenced job, or None after setting why the
        resource cannot start yet (DependenciesReady=False; its own reason for a failed job)."""
        missing = missing_secret_message(spec, self.options.storage_defaults, self.obs.secret_found, self.namespace)
        if missing:
            return self.blocked(SECRET_NOT_FOUND, missing)
        refs = check_references(wanted, self.obs.references, self.namespace, first_waiting_blocks=first_waiting_blocks)
        if refs.reason == REFERENCE_FAILED:
            self.condition(READY_TO_START, False, REFERENCE_FAILED, refs.message)
            self.reference_failed(refs.message)
            return None
        if refs.reason is not None:
            return self.blocked(refs.reason, refs.message, "Normal" if refs.reason == WAITING_FOR_REFERENCE else "Warning")
        return refs.resolved
