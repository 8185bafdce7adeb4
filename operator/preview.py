"""`kubetune render MANIFEST`: the Kubernetes objects the operator would create, without a cluster.

The `helm template` of kubetune, for reviews, GitOps diffs and policy checks (conftest, kyverno)
before anything is applied. It runs the operator's own first pass on the resource: the admission
check (`validation.admit`, so a manifest the webhook refuses is refused here with the same
message), then the kind's pure decision (`training/decide.py:reconcile`,
`serving/decide.py:reconcile_service`) with a world in which the S3 Secret exists and every
referenced job has succeeded. What it prints is what that decision creates: for a job, its
ConfigMap, headless Service, the PodGroup with `spec.gang`, and attempt-1 Job (or first the
prepare Job, when the datasets are tokenized once into an `s3://` cache); for an InferenceService, its Deployment, Service, adapters
ConfigMap, HPA and the API key's Secret (without the key, which is generated at creation).

A referenced job's output (`baseModelFrom`, `fromJob`) is only known on the cluster: it is shown
as `kubetune-ref://KIND/NAME`.
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune.operator.config import OperatorConfig
from kubetune.operator.references import service_references, training_references
from kubetune.operator.resources import TRAINING_KINDS
from kubetune.operator.validation import AdmissionRefused, admit, validate_resource
from kubetune.trainer.api.errors import EXIT_CONFIG_ERROR, KubetuneError, SpecError
from kubetune.trainer.api.specfile import REFERENCE_SCHEME

DEFAULT_NAMESPACE = "default"


class RenderRefused(KubetuneError):
    """The operator would create nothing for this manifest (refused, or waiting on a rule)."""

    exit_code = EXIT_CONFIG_ERROR


def render_manifest(document: dict[str, Any], config: OperatorConfig | None = None,
                    namespace: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
    """The objects the operator's first reconcile of `document` creates, in creation order."""
    config = config or OperatorConfig()
    cr = copy.deepcopy(document)
    meta = cr.setdefault("metadata", {})
    meta["namespace"] = namespace or meta.get("namespace") or DEFAULT_NAMESPACE
    meta.setdefault("generation", 1)
    try:
        admit("CREATE", None, cr, source=source, default_gib=config.gpu_memory_gib)
    except AdmissionRefused as exc:
        raise RenderRefused(str(exc)) from None
    if cr.get("kind") in TRAINING_KINDS:
        return _training_objects(cr, config)
    if cr.get("kind") == "InferenceService":
        return _serving_objects(cr, config)
    raise SpecError("kind", f"{cr.get('kind')!r} is not a kubetune resource.",
                    "render a FineTuneJob, AlignmentJob or InferenceService manifest.")


def _succeeded(wanted: Any) -> dict[str, Any]:
    ref = wanted.ref
    return {"kind": ref.kind, "metadata": {"name": ref.name},
            "status": {"phase": "Succeeded", "outputUri": f"{REFERENCE_SCHEME}{ref.kind}/{ref.name}"}}


def _training_objects(cr: dict[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    from kubetune.operator.training.decide import Observed, reconcile

    spec = validate_resource(cr)
    references = {w.key: _succeeded(w) for w in training_references(spec)}
    plan = reconcile(cr, Observed(secret_found=True, references=references), options=config.training)
    return _created(cr, plan)


def _serving_objects(cr: dict[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    from kubetune.operator.serving.decide import ServingObserved, reconcile_service

    spec = validate_resource(cr)
    references = {w.key: _succeeded(w) for w in service_references(spec)}
    plan = reconcile_service(cr, ServingObserved(secret_found=True, references=references), options=config.serving)
    objects = _created(cr, plan)
    return [plan.api_key_secret, *objects] if plan.api_key_secret is not None else objects


def _created(cr: dict[str, Any], plan: Any) -> list[dict[str, Any]]:
    if not plan.create:
        status = plan.status
        raise RenderRefused(f"the operator would create nothing yet for {cr['kind']} {cr['metadata']['name']}: "
                            f"{status.get('reason') or status.get('phase')}: {status.get('message') or ''}".rstrip(": "))
    return plan.create
