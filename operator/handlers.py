"""The kopf handlers: thin shells over `reconcile.py`.

Run with `kubetune operator` (or `kopf run -m kubetune.operator.handlers`). Every handler calls
one function, `reconcile_object`, which reads the resource fresh, observes its children, lets
the pure `reconcile()` decide, and carries out the plan. Change handlers (create, update,
resume) and Job events (the Job controller updating a Job's status) react at once; a timer
observes in-flight jobs and the trainer's status.json every `KUBETUNE_RECONCILE_INTERVAL`
seconds.

Finalizers: there is no delete handler: the children carry owner references, so Kubernetes'
garbage collector removes them with the resource (outputs in S3 are never touched). kopf puts
its finalizer on a resource only while a timer runs for it (it must stop the timer before the
resource goes), so the timers run only while there is something to observe (`_observe_job`,
`_observe_service`): a finished job (Succeeded, Failed) or a service that is Ready (its
Deployment's events wake it) or Failed for a reason only a spec change fixes has no timer and no
finalizer, costs nothing, and can be deleted with the operator gone. A spec change (update
handler) or a child's event reconciles such a resource again at once.

Watches: Jobs and Deployments are watched with a label filter (`CHILD_LABELS`: the labels every
rendered child carries), so the handlers never run for anyone else's. kopf filters watch events
in the operator (it has no server-side label selector), so the operator still needs list/watch
on Jobs and Deployments in the namespaces it serves (`-n` narrows them).

Environment (set by `kubetune operator` from its flags):
- KUBETUNE_TRAINER_IMAGE: default image of the training pods;
- KUBETUNE_RECONCILE_INTERVAL: seconds between observations of a job in flight (default 10);
- KUBETUNE_KOPF_EVENTS=0: do not let kopf post its own log events (ours are always posted);
- KUBETUNE_METRICS_PORT: serve the operator's Prometheus metrics on this port;
- KUBETUNE_DEFAULT_S3_ENDPOINT / _SECRET: S3 endpoint and credentials Secret of pods whose
  resource sets no `spec.storage` (the resource's own settings win);
- KUBETUNE_WEBHOOK_PORT / _HOST / _CERT / _KEY / _MANAGED: serve the validating admission
  webhook (and let kopf manage its ValidatingWebhookConfiguration when _MANAGED is set).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from typing import Any

import kopf

from kubetune.operator.kube import Kube, KubeError
from kubetune.operator.metrics import record_phase, timed_reconcile
from kubetune.operator.reconcile import (
    Event,
    Observed,
    needs_reconcile,
    needs_trainer_status,
    reconcile,
    status_patch,
)
from kubetune.operator.references import observe_references, observe_secret, training_references
from kubetune.operator.render.common import (
    LABEL_KIND,
    MANAGED_BY,
    StorageDefaults,
    child_names,
    is_owned_by,
    selector_labels,
)
from kubetune.operator.render.training import RenderOptions
from kubetune.operator.resources import GROUP, KINDS, TERMINAL_PHASES, TRAINING_KINDS, VERSION
from kubetune.operator.status import (
    COND_SYNCED,
    READY_TO_START,
    condition_is,
    get_condition,
    now_iso,
    read_trainer_status,
    set_condition,
)
from kubetune.operator.validation import AdmissionRefused, admit, validate_resource
from kubetune.trainer.api.errors import SpecErrors

log = logging.getLogger("kubetune.operator")

INTERVAL = float(os.environ.get("KUBETUNE_RECONCILE_INTERVAL", "10"))
TRAINING_PLURALS = [KINDS[k].plural for k in TRAINING_KINDS]

_state: dict[str, Any] = {}
_locks: dict[tuple[str, str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = _flag("KUBETUNE_KOPF_EVENTS", True)
    settings.scanning.disabled = not _flag("KUBETUNE_KOPF_SCANNING", True)
    settings.watching.server_timeout = int(os.environ.get("KUBETUNE_WATCH_TIMEOUT", "300"))
    # A resource deleted while its timer's handler runs: re-check every second (kopf's default is
    # 60 s) whether the timer has exited, so the finalizer goes and the deletion completes promptly.
    settings.background.cancellation_polling = 1.0
    port = os.environ.get("KUBETUNE_WEBHOOK_PORT")
    if port:
        settings.admission.server = kopf.WebhookServer(
            addr=os.environ.get("KUBETUNE_WEBHOOK_ADDR", "0.0.0.0"),
            port=int(port),
            host=os.environ.get("KUBETUNE_WEBHOOK_HOST") or None,
            certfile=os.environ.get("KUBETUNE_WEBHOOK_CERT") or None,
            pkeyfile=os.environ.get("KUBETUNE_WEBHOOK_KEY") or None,
            insecure=_flag("KUBETUNE_WEBHOOK_INSECURE", False),
        )
        managed = os.environ.get("KUBETUNE_WEBHOOK_MANAGED")
        if managed:
            settings.admission.managed = managed
    metrics_port = os.environ.get("KUBETUNE_METRICS_PORT")
    if metrics_port:
        from kubetune.operator.metrics import serve

        serve(int(metrics_port))
    _state["kube"] = Kube()
    _state["options"] = RenderOptions(
        default_image=os.environ.get("KUBETUNE_TRAINER_IMAGE") or RenderOptions.default_image,
        storage_defaults=StorageDefaults.from_environment(),
    )


def _lock(kind: str, namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((kind, namespace, name), threading.Lock())


def _storage_settings(cr: dict[str, Any]) -> Any:
    """StorageSpec for reading status.json: the job's training.storage, with the cluster-level
    endpoint as a fallback. Credentials are the operator's own (its environment / identity)."""
    from kubetune.trainer.api.spec import StorageSpec

    spec = cr.get("spec") or {}
    raw = dict(((spec.get("training") or {}).get("storage")) or {})
    endpoint = (spec.get("storage") or {}).get("endpoint") or StorageDefaults.from_environment().endpoint
    if endpoint and not raw.get("endpointUrl"):
        raw["endpointUrl"] = endpoint
    try:
        return StorageSpec.model_validate(raw)
    except Exception:
        return StorageSpec()


def observe(kube: Kube, cr: dict[str, Any], options: RenderOptions | None = None) -> Observed:
    kind, meta = cr["kind"], cr["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    names = child_names(kind, name)
    status = cr.get("status") or {}
    jobs = [j for j in kube.list("Job", namespace, selector_labels(kind, name)) if is_owned_by(j, cr)]
    observed = Observed(
        jobs=jobs,
        config_map=kube.get("ConfigMap", namespace, names.config_map),
        service=kube.get("Service", namespace, names.service),
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
    location = needs_trainer_status(cr)
    if location:
        observed.trainer_status = read_trainer_status(location, _storage_settings(cr))
    return observed


def reconcile_object(kind: str, namespace: str, name: str, kube: Kube | None = None, options: RenderOptions | None = None) -> None:
    """Read, observe, decide, act — for one resource, one thread at a time."""
    kube = kube or _state["kube"]
    options = options or _state["options"]
    with _lock(kind, namespace, name), timed_reconcile(kind):
        cr = kube.get(kind, namespace, name)
        if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
            record_phase(kind, namespace, name, None)
            return
        cr.setdefault("metadata", {}).setdefault("namespace", namespace)
        cr.setdefault("kind", kind)
        if not needs_reconcile(cr):
            record_phase(kind, namespace, name, (cr.get("status") or {}).get("phase"))
            return
        plan = reconcile(cr, observe(kube, cr, options), options=options)
        record_phase(kind, namespace, name, plan.status.get("phase") or (cr.get("status") or {}).get("phase"))
        report_forbidden(cr, plan, _act(kube, cr, plan))
        # Events before the status: whoever sees the new status can also find its events.
        for event in plan.events:
            kube.post_event(cr, event.type, event.reason, event.message)
        patch = status_patch(cr.get("status"), plan.status)
        if patch:
            kube.patch(kind, namespace, name, {"status": patch}, subresource="status")


def _act(kube: Kube, cr: dict[str, Any], plan: Any) -> list[KubeError]:
    """Create and patch the plan's children. A call the operator's RBAC forbids (403) is
    collected, not raised, so it can be reported on the resource; the timer retries it. Other
    errors raise (kopf retries the handler with backoff)."""
    kind, namespace, name = cr["kind"], cr["metadata"]["namespace"], cr["metadata"]["name"]
    forbidden: list[KubeError] = []
    for obj in plan.create:
        try:
            _, created = kube.create(obj)
        except KubeError as exc:
            if not exc.forbidden:
                raise
            forbidden.append(exc)
            continue
        log.info("%s %s/%s: %s %s", kind, namespace, name,
                 "created" if created else "found existing", f"{obj['kind']} {obj['metadata']['name']}")
    for child_kind, child_name, patch in plan.patch:
        try:
            kube.patch(child_kind, namespace, child_name, patch)
        except KubeError as exc:
            if not exc.forbidden:
                raise
            forbidden.append(exc)
    return forbidden


def report_forbidden(cr: dict[str, Any], plan: Any, forbidden: list[KubeError]) -> None:
    """Condition `Synced` (False, reason Forbidden) and one Warning event naming each refused
    call, so that a missing RBAC grant shows in `kubectl describe`, not only in the operator's
    log. The condition turns True again once every call is allowed. The rest of the status is
    left as it was: the plan assumed its calls succeed."""
    before = get_condition(cr.get("status") or {}, COND_SYNCED) or {}
    generation = (cr.get("metadata") or {}).get("generation")
    if not forbidden:
        if before.get("reason") == "Forbidden":
            set_condition(plan.status, COND_SYNCED, True, "Reconciled", "", now=now_iso(), generation=generation)
        return
    # Not everything the plan describes happened: keep the status (and the events) as they were,
    # so the next pass decides again from what exists, rather than from a Job that was refused.
    plan.status = copy.deepcopy(cr.get("status") or {})
    plan.events = []
    calls = sorted({exc.permission() for exc in forbidden})
    message = (f"the operator is not allowed to {'; '.join(calls)} (HTTP 403): the change is not applied. "
               "Grant it to the operator's ServiceAccount (the Helm chart's RBAC does: upgrade the chart).")
    set_condition(plan.status, COND_SYNCED, False, "Forbidden", message, now=now_iso(), generation=generation)
    if before.get("reason") == "Forbidden" and before.get("message") == message:
        return  # reported already; the timer retries every few seconds
    log.warning("%s %s/%s: %s", cr["kind"], cr["metadata"]["namespace"], cr["metadata"]["name"], message)
    plan.events.append(Event("Warning", "Forbidden", message))


def _on_change(body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
    reconcile_object(body["kind"], namespace, name)


def _observe_job(status: kopf.Status, **_: Any) -> bool:
    """Whether a training resource needs its timer: not once it has Succeeded or Failed. A failed
    one is retried on a spec change (the update handler), never by polling."""
    return status.get("phase") not in TERMINAL_PHASES


def _observe_service(status: kopf.Status, **_: Any) -> bool:
    """Whether an InferenceService needs its timer: while it waits for something no watch of
    ours reports (a referenced job, a Secret, a foreign object in the way) or has not settled.
    A Ready service (whose pending update waits for nothing) follows its Deployment's events; a
    service that Failed for its spec or its rollout waits for a spec change or a Deployment event."""
    phase = status.get("phase")
    waiting = condition_is(dict(status), READY_TO_START, "False")
    if phase == "Ready":
        return waiting
    if phase == "Failed":
        return status.get("reason") in ("NameConflict", "ReferenceFailed")
    return True


def _on_job_event(body: kopf.Body, namespace: str, **_: Any) -> None:
    """A Job of ours changed (the Job controller updated its status): reconcile its owner now
    rather than at the next timer tick."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") in TRAINING_KINDS and ref.get("controller"):
            reconcile_object(ref["kind"], namespace, ref["name"])


def _admit(body: kopf.Body, old: Any, operation: str | None, warnings: list[str], **_: Any) -> None:
    """Validating admission: refuse a bad spec with the message `kubetune validate` prints."""
    try:
        warnings.extend(admit(operation, dict(old) if old else None, dict(body)))
    except AdmissionRefused as exc:
        raise kopf.AdmissionError(str(exc), code=422) from None


def _child_labels(*kinds: str) -> dict[str, Any]:
    """The labels of our children of these owner kinds (`render.common.labels_for`)."""
    singulars = {KINDS[k].singular for k in kinds}
    return {"app.kubernetes.io/managed-by": MANAGED_BY,
            LABEL_KIND: lambda value, **_: value in singulars}


kopf.on.event("batch", "v1", "jobs", id="job-changed", labels=_child_labels(*TRAINING_KINDS))(_on_job_event)

for _plural in TRAINING_PLURALS:
    kopf.on.create(GROUP, VERSION, _plural, id="reconcile-create")(_on_change)
    kopf.on.update(GROUP, VERSION, _plural, id="reconcile-update", field="spec")(_on_change)
    kopf.on.resume(GROUP, VERSION, _plural, id="reconcile-resume")(_on_change)
    kopf.timer(GROUP, VERSION, _plural, id="observe", interval=INTERVAL, when=_observe_job)(_on_change)
    if os.environ.get("KUBETUNE_WEBHOOK_PORT"):  # kopf refuses admission handlers without a server
        kopf.on.validate(GROUP, VERSION, _plural, id="validate-spec", operations=["CREATE", "UPDATE"])(_admit)


# -- InferenceService (issue 8): the decision logic is kubetune.operator.serving -------------

SERVICE_KIND = "InferenceService"


def _on_service_change(name: str, namespace: str, **_: Any) -> None:
    """Create/update/resume of an InferenceService, and a timer that follows its Deployment and
    notices when a referenced training job has succeeded."""
    from kubetune.operator.serving import reconcile_service_object

    with _lock(SERVICE_KIND, namespace, name), timed_reconcile(SERVICE_KIND):
        reconcile_service_object(_state["kube"], namespace, name)


def _on_deployment_event(body: kopf.Body, namespace: str, **_: Any) -> None:
    """A Deployment of ours changed (rollout progress, replicas ready): update the status now."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == SERVICE_KIND and ref.get("controller"):
            _on_service_change(name=ref["name"], namespace=namespace)


kopf.on.event("apps", "v1", "deployments", id="deployment-changed",
              labels=_child_labels(SERVICE_KIND))(_on_deployment_event)
_service_plural = KINDS[SERVICE_KIND].plural
kopf.on.create(GROUP, VERSION, _service_plural, id="reconcile-create")(_on_service_change)
kopf.on.update(GROUP, VERSION, _service_plural, id="reconcile-update", field="spec")(_on_service_change)
kopf.on.resume(GROUP, VERSION, _service_plural, id="reconcile-resume")(_on_service_change)
kopf.timer(GROUP, VERSION, _service_plural, id="observe", interval=INTERVAL, when=_observe_service)(_on_service_change)
if os.environ.get("KUBETUNE_WEBHOOK_PORT"):
    kopf.on.validate(GROUP, VERSION, _service_plural, id="validate-spec", operations=["CREATE", "UPDATE"])(_admit)
