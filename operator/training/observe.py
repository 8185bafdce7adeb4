"""What exists around a FineTuneJob/AlignmentJob: its Jobs (every attempt), ConfigMap and
Service, the S3 Secret and the referenced jobs before it starts, Kueue's Workload of a Job that
Kueue holds (`kueue.py`), the trainer's status.json while it runs. The only reads of the training loop; `decide.py` turns them into a plan."""

from __future__ import annotations

from typing import Any

from kubetune.operator.common import StorageDefaults, child_names, is_owned_by, selector_labels
from kubetune.operator.references import observe_references, observe_secret, training_references
from kubetune.operator.resources import TERMINAL_PHASES
from kubetune.operator.status import read_trainer_status
from kubetune.operator.training.decide import Observed, needs_trainer_status
from kubetune.operator.training.kueue import observe_workloads
from kubetune.operator.training.render import POD_GROUP_API, RenderOptions
from kubetune.operator.validation import validate_resource
from kubetune.trainer.api.errors import SpecErrors


def storage_settings(cr: dict[str, Any], defaults: StorageDefaults | None = None) -> Any:
    """StorageSpec for reading status.json: the job's training.storage, with the cluster-level
    endpoint as a fallback. Credentials are the operator's own (its environment / identity)."""
    from kubetune.trainer.api.spec import StorageSpec

    spec = cr.get("spec") or {}
    raw = dict(((spec.get("training") or {}).get("storage")) or {})
    endpoint = (spec.get("storage") or {}).get("endpoint") or (defaults or StorageDefaults()).endpoint
    if endpoint and not raw.get("endpointUrl"):
        raw["endpointUrl"] = endpoint
    try:
        return StorageSpec.model_validate(raw)
    except Exception:
        return StorageSpec()


def observe(kube: Any, cr: dict[str, Any], options: RenderOptions | None = None) -> Observed:
    kind, meta = cr["kind"], cr["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    names = child_names(kind, name)
    status = cr.get("status") or {}
    jobs = [j for j in kube.list("Job", namespace, selector_labels(kind, name)) if is_owned_by(j, cr)]
    observed = Observed(
        jobs=jobs,
        config_map=kube.get("ConfigMap", namespace, names.config_map),
        service=kube.get("Service", namespace, names.service),
        workloads=observe_workloads(kube, cr, jobs),
    )
    started = bool(status.get("trainingHash")) or bool(jobs)
    if not started and status.get("phase") not in TERMINAL_PHASES:
        try:
            spec = validate_resource(cr)
        except SpecErrors:
            spec = None
        if spec is not None:
            # The Secret the pods will reference: the resource's own, else the operator's default.
            defaults = (options or RenderOptions()).storage_defaults
            observed.secret_found = observe_secret(kube, namespace, spec, defaults)
            observed.references = observe_references(kube, namespace, training_references(spec))
            if spec.gang is not None:  # discovery: no RBAC grant
                observed.pod_group_api = kube.serves(POD_GROUP_API[spec.gang.scheduler], "podgroups")
    location = needs_trainer_status(cr)
    if location:
        observed.trainer_status = read_trainer_status(location, storage_settings(cr, (options or RenderOptions()).storage_defaults))
    return observed
