"""Names, labels and owner references shared by every rendered child (pure functions)."""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from kubetune.operator.resources import API_VERSION, KINDS

MANAGED_BY = "kubetune-operator"
LABEL_KIND = "kubetune.io/kind"
LABEL_NAME = "kubetune.io/name"
LABEL_ATTEMPT = "kubetune.io/attempt"
ANNOTATION_ATTEMPT = "kubetune.io/attempt"
ANNOTATION_TRAINING_HASH = "kubetune.io/training-hash"

_SHORT = {"FineTuneJob": "ftj", "AlignmentJob": "alj", "InferenceService": "isvc"}
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

JOB_NAME_MAX = 52
"""An Indexed Job's pods get the hostname `<job>-<index>`, which must stay a DNS label (63)."""


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(base: str, suffix: str = "", max_len: int = 63) -> str:
    """A DNS-1035 label from a resource name (which may be longer or contain dots): lowercase,
    starts with a letter, at most `max_len` characters; shortened names get a hash so two long
    names never collide."""
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-") or "x"
    if not name[0].isalpha():
        name = "k" + name
    full = f"{name}-{suffix}" if suffix else name
    if name == base and len(full) <= max_len:
        return full
    tail = f"-{_digest(base)}" + (f"-{suffix}" if suffix else "")
    return name[: max_len - len(tail)].rstrip("-") + tail


def label_value(value: str) -> str:
    """A valid label value (<= 63 characters) for a name; long names are shortened with a hash."""
    if len(value) <= 63 and _LABEL_VALUE_RE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    tail = "-" + _digest(value)
    return cleaned[: 63 - len(tail)].rstrip("-_.") + tail


@dataclass(frozen=True)
class ChildNames:
    """The deterministic names of a training resource's children."""

    base: str
    config_map: str
    service: str

    def job(self, attempt: int) -> str:
        return f"{self.base}-a{attempt}"


def child_names(kind: str, name: str) -> ChildNames:
    # Leave room for "-a<attempt>" (up to 4 digits) in the Job name.
    base = dns_label(name, _SHORT[kind], max_len=JOB_NAME_MAX - 6)
    return ChildNames(base=base, config_map=f"{base}-config", service=base)


def selector_labels(kind: str, name: str) -> dict[str, str]:
    """The labels that select a resource's pods (the headless Service's selector)."""
    return {
        LABEL_KIND: KINDS[kind].singular,
        LABEL_NAME: label_value(name),
    }


def labels_for(kind: str, name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(kind, name),
    }


def owner_reference(cr: dict[str, Any]) -> dict[str, Any]:
    """Owner reference to the custom resource: deleting it garbage-collects the children."""
    meta = cr.get("metadata") or {}
    return {
        "apiVersion": cr.get("apiVersion") or API_VERSION,
        "kind": cr["kind"],
        "name": meta["name"],
        "uid": meta.get("uid") or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_owned_by(obj: dict[str, Any], cr: dict[str, Any]) -> bool:
    """Whether `obj` is controlled by `cr` (by uid when both have one, else by kind and name)."""
    meta = cr.get("metadata") or {}
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") != cr.get("kind") or ref.get("name") != meta.get("name"):
            continue
        if meta.get("uid") and ref.get("uid") and ref["uid"] != meta["uid"]:
            continue
        return True
    return False


@dataclass(frozen=True)
class StorageDefaults:
    """The operator's S3 settings for pods whose resource sets none (`--default-s3-endpoint`,
    `--default-s3-secret`). Platform teams set them once (Helm values `jobs.s3.*`) instead of
    in every manifest; a resource's own `spec.storage` always wins. Only the Secret's *name*
    is known here: its values reach the pods as secretKeyRef variables."""

    endpoint: str | None = None
    secret: str | None = None
    """A Secret (in each resource's namespace) with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""


def effective_storage(spec: Any, defaults: StorageDefaults | None) -> Any:
    """`spec.storage` with the operator's defaults filled in where the resource sets nothing.

    The default Secret is not applied to a resource that names its own `serviceAccountName`:
    that is how a resource asks for pod identity (IRSA, workload identity), and credentials in
    the environment would take precedence over it in every AWS SDK."""
    from kubetune.operator.resources import ClusterStorage, SecretRef

    storage = spec.storage
    if defaults is None:
        return storage
    endpoint = storage.endpoint or defaults.endpoint
    ref = storage.secretRef
    if ref is None and defaults.secret and not getattr(spec, "serviceAccountName", None):
        ref = SecretRef(name=defaults.secret)
    if endpoint == storage.endpoint and ref is storage.secretRef:
        return storage
    return ClusterStorage(endpoint=endpoint, secretRef=ref)


def storage_env(storage: Any) -> list[dict[str, Any]]:
    """S3 endpoint and credentials for a pod: credentials only as secretKeyRef, never inlined.
    Pass `effective_storage(spec, defaults)` to include the operator's defaults."""
    env: list[dict[str, Any]] = []
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": str(storage.endpoint)})
    ref = storage.secretRef
    if ref is not None:
        keys = [("AWS_ACCESS_KEY_ID", ref.accessKeyIdKey, False), ("AWS_SECRET_ACCESS_KEY", ref.secretAccessKeyKey, False)]
        if ref.sessionTokenKey:
            keys.append(("AWS_SESSION_TOKEN", ref.sessionTokenKey, True))
        for var, key, optional in keys:
            selector: dict[str, Any] = {"name": ref.name, "key": key}
            if optional:
                selector["optional"] = True
            env.append({"name": var, "valueFrom": {"secretKeyRef": selector}})
    return env


def scheduling_fields(spec: Any) -> dict[str, Any]:
    """Pod-spec fields a resource passes through to its pods: identity, priority, placement."""
    fields: dict[str, Any] = {}
    if spec.serviceAccountName:
        fields["serviceAccountName"] = spec.serviceAccountName
    if spec.priorityClassName:
        fields["priorityClassName"] = spec.priorityClassName
    if spec.nodeSelector:
        fields["nodeSelector"] = dict(spec.nodeSelector)
    if spec.tolerations:
        fields["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in spec.tolerations]
    if spec.affinity:
        fields["affinity"] = copy.deepcopy(spec.affinity)
    return fields


def pod_security_context(uid: int) -> dict[str, Any]:
    """Every kubetune pod runs as a fixed non-root user with the runtime's default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue's label: a resource that carries it is admitted by Kueue (its Jobs start suspended)."""
RESERVED_PREFIXES = ("kubetune.io/", "app.kubernetes.io/", "kopf.zalando.org/", "kubectl.kubernetes.io/")
"""Label/annotation keys never copied from a resource to its children (ours, kopf's, kubectl's)."""


def queued(cr: dict[str, Any]) -> str | None:
    """The Kueue LocalQueue the resource is submitted to, or None."""
    return ((cr.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def propagated_metadata(cr: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The resource's own labels and annotations for its Jobs and pods (Kueue's queue-name and
    priority-class, a team's cost labels, a mesh's annotations), minus the reserved keys."""
    meta = cr.get("metadata") or {}

    def keep(items: dict[str, Any] | None) -> dict[str, str]:
        return {k: str(v) for k, v in (items or {}).items() if not k.startswith(RESERVED_PREFIXES)}

    return keep(meta.get("labels")), keep(meta.get("annotations"))


def with_propagated(cr: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """`job` with the resource's labels/annotations on it and its pod template; ours win."""
    labels, annotations = propagated_metadata(cr)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"] = {**labels, **(meta.get("labels") or {})}
        if annotations or meta.get("annotations"):
            meta["annotations"] = {**annotations, **(meta.get("annotations") or {})}
    return job
