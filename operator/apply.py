"""The operator's one read -> observe -> decide -> apply loop, for every kind.

A kind plugs in as a `Component` (`training.COMPONENT`, `serving.COMPONENT`): how to observe the
world around a resource, the pure decision, and how a refused (403) call is reported on it. This
module alone writes: children (create / patch / delete), the generated API-key Secret, events,
then the status. A write the operator's RBAC forbids is collected and the others still run, so
one missing permission never blocks every other change; it is reported on the resource (a
condition and a Warning event) instead of only in the operator's log. Other API errors raise,
and kopf retries the handler with backoff.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.operator.kube import KubeError
from kubetune.operator.metrics import record_phase
from kubetune.operator.plan import Plan, status_patch

log = logging.getLogger("kubetune.operator")

@dataclass(frozen=True)
class Component:
    """One kind's part of the loop: `observe(kube, cr, config)` reads what exists around the
    resource, `decide(cr, observed, config)` is pure, `report_forbidden(cr, plan, refused)`
    rewrites the plan's status when some calls were refused (also called with none refused,
    to clear an earlier report), `needs_reconcile(cr)` skips resources nothing can change."""

    kind: str
    observe: Callable[[Any, dict[str, Any], Any], Any]
    decide: Callable[[dict[str, Any], Any, Any], Plan]
    report_forbidden: Callable[[dict[str, Any], Plan, list[KubeError]], None]
    needs_reconcile: Callable[[dict[str, Any]], bool] = lambda cr: True


def reconcile_resource(kube: Any, component: Component, namespace: str, name: str, config: Any) -> None:
    """Read the resource fresh, observe, decide, apply, report: running it twice on the same
    world changes nothing (children are found by name and owner)."""
    kind = component.kind
    cr = kube.get(kind, namespace, name)
    if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
        record_phase(kind, namespace, name, None)
        return
    cr.setdefault("metadata", {}).setdefault("namespace", namespace)
    cr.setdefault("kind", kind)
    if not component.needs_reconcile(cr):
        record_phase(kind, namespace, name, (cr.get("status") or {}).get("phase"))
        return
    plan = component.decide(cr, component.observe(kube, cr, config), config)
    component.report_forbidden(cr, plan, apply_plan(kube, cr, plan))
    record_phase(kind, namespace, name, plan.status.get("phase") or (cr.get("status") or {}).get("phase"))
    write_outcome(kube, cr, plan)


def apply_plan(kube: Any, cr: dict[str, Any], plan: Plan) -> list[KubeError]:
    """Carry out the plan's writes to children; returns the calls RBAC refused."""
    meta = cr["metadata"]
    where = f"{cr['kind']} {meta['namespace']}/{meta['name']}"
    refused: list[KubeError] = []

    def attempt(action: Callable[[], Any]) -> None:
        try:
            action()
        except KubeError as exc:
            if not exc.forbidden:
                raise
            refused.append(exc)

    if plan.api_key_secret is not None:
        attempt(lambda: _create_api_key_secret(kube, plan.api_key_secret, plan.api_key_field, where))
    for obj in plan.create:
        attempt(lambda obj=obj: _create(kube, obj, where))
    for kind, child, patch in plan.patch:
        attempt(lambda kind=kind, child=child, patch=patch: kube.patch(kind, meta["namespace"], child, patch))
    for kind, child in plan.delete:  # an absent child is fine (`Kube.delete` returns False)
        attempt(lambda kind=kind, child=child: kube.delete(kind, meta["namespace"], child))
    return refused


def write_outcome(kube: Any, cr: dict[str, Any], plan: Plan) -> None:
    """Events before the status: whoever sees the new status can also find its events."""
    meta = cr["metadata"]
    for event in plan.events:
        kube.post_event(cr, event.type, event.reason, event.message)
    patch = status_patch(cr.get("status"), plan.status)
    if patch:
        kube.patch(cr["kind"], meta["namespace"], meta["name"], {"status": patch}, subresource="status")


CREATED_IF_ABSENT = ("PodGroup",)
"""Kinds created without reading an existing one back (no `get` grant): a gang's PodGroup,
created before each attempt's Job and never changed."""


def _create(kube: Any, obj: dict[str, Any], where: str) -> None:
    if obj["kind"] in CREATED_IF_ABSENT:
        created = kube.create_if_absent(obj)
    else:
        _, created = kube.create(obj)
    log.info("%s: %s %s %s", where, "created" if created else "found existing", obj["kind"], obj["metadata"]["name"])


def _create_api_key_secret(kube: Any, secret: dict[str, Any], field: str, where: str) -> None:
    """Create the generated API key's Secret unless it exists. The key is made here, sent once
    in the create request and forgotten: it is never logged, put in an event or the status."""
    body = {**secret, "stringData": {field: secrets.token_urlsafe(32)}}
    if kube.create_if_absent(body):
        log.info("%s: created Secret %s (a generated API key)", where, secret["metadata"]["name"])
