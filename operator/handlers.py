"""The kopf handlers: a few lines each, over `apply.reconcile_resource` and the kinds' components.

`register(registry, config)` puts every handler into a registry built for one `OperatorConfig`
(`main.run` passes it to `kopf.run`); nothing registers at import time. Every handler ends in
the same call: read the resource fresh, observe its children, let the kind's pure decision
choose, carry the plan out (`apply.py`). Change handlers (create, update of spec, resume) and
child events (the Job controller updating a Job, a Deployment's rollout) react at once; a timer
observes in-flight resources every `config.reconcile_interval` seconds.

Finalizers: there is no delete handler: the children carry owner references, so Kubernetes'
garbage collector removes them with the resource (outputs in S3 are never touched). kopf puts
its finalizer on a resource only while a timer runs for it (it must stop the timer before the
resource goes), so the timers run only while there is something to observe (`wants_job_timer`,
`wants_service_timer`): a finished job or a settled service has no timer and no finalizer,
costs nothing, and can be deleted with the operator gone.

Watches: Jobs and Deployments are watched with a label filter (`child_labels`: the labels every
rendered child carries), so the handlers never run for anyone else's. kopf filters watch events
in the operator (it has no server-side label selector), so the operator still needs list/watch
on Jobs and Deployments in the namespaces it serves (`-n` narrows them).
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.operator.apply import Component, reconcile_resource
from kubetune.operator.common import LABEL_KIND, MANAGED_BY
from kubetune.operator.config import OperatorConfig
from kubetune.operator.kube import Kube
from kubetune.operator.metrics import timed_reconcile
from kubetune.operator.resources import GROUP, KINDS, TERMINAL_PHASES, TRAINING_KINDS, VERSION
from kubetune.operator.serving.component import COMPONENT as SERVING
from kubetune.operator.status import READY_TO_START, condition_is
from kubetune.operator.training.component import component as training_component
from kubetune.operator.webhook import configure_webhook, validate_handler

COMPONENTS: dict[str, Component] = {kind: training_component(kind) for kind in TRAINING_KINDS}
COMPONENTS[SERVING.kind] = SERVING


def reconcile_now(memo: Any, kind: str, namespace: str, name: str) -> None:
    """One resource, one thread at a time."""
    with memo.locks.of(kind, namespace, name), timed_reconcile(kind):
        reconcile_resource(memo.kube, COMPONENTS[kind], namespace, name, memo.config)


def on_change(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    reconcile_now(memo, body["kind"], namespace, name)


def on_child_event(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A Job or Deployment of ours changed: reconcile its owner now, not at the next timer tick."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") in COMPONENTS and ref.get("controller"):
            reconcile_now(memo, ref["kind"], namespace, ref["name"])


def wants_job_timer(status: kopf.Status, **_: Any) -> bool:
    """Not once a training resource has Succeeded or Failed: a failed one is retried on a spec
    change (the update handler), never by polling."""
    return status.get("phase") not in TERMINAL_PHASES


def wants_service_timer(status: kopf.Status, **_: Any) -> bool:
    """While an InferenceService waits for something no watch of ours reports (a referenced job,
    a Secret, a foreign object in the way, KEDA to be installed) or has not settled. A Ready one follows its
    Deployment's events; one that Failed for its spec or its rollout waits for a change."""
    phase = status.get("phase")
    if phase == "Ready":
        return condition_is(dict(status), READY_TO_START, "False")
    if phase == "Failed":
        return status.get("reason") in ("NameConflict", "ReferenceFailed", "KedaNotInstalled")
    return True


def child_labels(*kinds: str) -> dict[str, Any]:
    """The labels of our children of these owner kinds (`common.labels_for`)."""
    singulars = {KINDS[k].singular for k in kinds}
    return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_KIND: lambda value, **_: value in singulars}


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> kopf.OperatorRegistry:
    """Every handler of the operator, into `registry`."""

    # A fresh registry has none of kopf's default logins: the kubernetes client's (in-cluster
    # ServiceAccount, else $KUBECONFIG), which `Kube` uses too.
    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_settings(settings, config)
        memo.kube = Kube()

    kopf.on.event("batch", "v1", "jobs", id="job-changed", labels=child_labels(*TRAINING_KINDS),
                  registry=registry)(on_child_event)
    kopf.on.event("apps", "v1", "deployments", id="deployment-changed", labels=child_labels(SERVING.kind),
                  registry=registry)(on_child_event)
    for kind in COMPONENTS:
        plural = KINDS[kind].plural
        when = wants_job_timer if kind in TRAINING_KINDS else wants_service_timer
        kopf.on.create(GROUP, VERSION, plural, id="reconcile-create", registry=registry)(on_change)
        kopf.on.update(GROUP, VERSION, plural, id="reconcile-update", field="spec", registry=registry)(on_change)
        kopf.on.resume(GROUP, VERSION, plural, id="reconcile-resume", registry=registry)(on_change)
        kopf.timer(GROUP, VERSION, plural, id="observe", interval=config.reconcile_interval, when=when,
                   registry=registry)(on_change)
        if config.webhook is not None:  # kopf refuses admission handlers without a server
            kopf.on.validate(GROUP, VERSION, plural, id="validate-spec", operations=["CREATE", "UPDATE"],
                             registry=registry)(validate_handler)
    return registry


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf's settings for this configuration (the `startup` handler applies them)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = config.kopf_events
    settings.scanning.disabled = not config.scanning
    settings.watching.server_timeout = config.watch_timeout
    # A resource deleted while its timer's handler runs: re-check every second (kopf's default is
    # 60 s) whether the timer has exited, so the finalizer goes and the deletion completes promptly.
    settings.background.cancellation_polling = 1.0
    if config.webhook is not None:
        configure_webhook(settings, config.webhook)
    if config.metrics_port:
        from kubetune.operator.metrics import serve

        serve(config.metrics_port)
