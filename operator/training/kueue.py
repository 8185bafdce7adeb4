"""What Kueue says about a queued job: the Workload it made for the job's batch/v1 Job.

Kueue keeps its decision on its own object, not on the Job: a Workload, owned by the Job
(controller owner reference), whose conditions say whether quota is reserved (and, when not,
why: `couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu
...`), whether it is admitted, and whether it was evicted (reason Preempted for a preemption,
PodsReadyTimeout when waitForPodsReady gave up on a gang that could not be placed, ...). The
operator reads it only for a queued resource whose Job is suspended (Kueue holds it), so that
the resource's status tells the user why it waits and whether it was preempted.

RBAC: `list` on kueue.x-k8s.io workloads, nothing else (the chart's `kubetune.rules`): one
list per suspended Job, narrowed on the server by Kueue's `kueue.x-k8s.io/job-uid` label and
checked here by the owner reference. Without Kueue (its API not served) there is no Workload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kubetune.operator.common import queued
from kubetune.operator.kube import KubeError

log = logging.getLogger("kubetune.operator")

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
"""v1beta2 since Kueue v0.15; v1beta1 before (same conditions)."""
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
EVICTED_BY_PREEMPTION = "Preempted"
"""Reason of the Workload's Evicted condition when another workload preempted it."""


def list_workloads(kube: Any, namespace: str, job_uid: str) -> list[dict[str, Any]] | None:
    """Workloads labelled with `job_uid`, from the newest Workload API the server serves, or
    None when it serves none (Kueue is not installed)."""
    for version in KUEUE_VERSIONS:
        try:
            return kube.list_custom(f"{KUEUE_GROUP}/{version}", "workloads", namespace, f"{JOB_UID_LABEL}={job_uid}")
        except KubeError as exc:
            if exc.status != 404:
                raise
    return None


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def observe_workloads(kube: Any, cr: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Job name -> its Workload, for the suspended, unfinished Jobs of a queued resource (those
    Kueue holds). A 403 (a chart without the grant) leaves the status without Kueue's words and
    is logged, rather than stopping the reconcile."""
    if not queued(cr):
        return {}
    found: dict[str, dict[str, Any]] = {}
    for job in jobs:
        meta, status = job.get("metadata") or {}, job.get("status") or {}
        held = (job.get("spec") or {}).get("suspend") and not status.get("completionTime")
        if not held or not meta.get("uid") or any(
                c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions") or []):
            continue
        try:
            items = list_workloads(kube, meta.get("namespace") or cr["metadata"]["namespace"], meta["uid"])
        except KubeError as exc:
            if not exc.forbidden:
                raise
            log.warning("cannot read Kueue's Workload of Job %s: %s", meta.get("name"), exc.permission())
            return found
        if items is None:
            return found  # Kueue's API is not served
        workload = next((w for w in items if owned_by(w, meta["uid"])), None)
        if workload is not None:
            found[meta["name"]] = workload
    return found


@dataclass(frozen=True)
class KueueView:
    """The Workload, in the words the resource's status needs."""

    evicted_reason: str | None = None
    """Reason of a True Evicted condition (it stays True until quota is reserved again)."""
    evicted_message: str = ""
    waiting: str = ""
    """Why it is not admitted: the False QuotaReserved (else Admitted) condition's message."""

    @property
    def preempted(self) -> bool:
        return self.evicted_reason == EVICTED_BY_PREEMPTION


def _condition(workload: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def view(workload: dict[str, Any] | None) -> KueueView | None:
    """What the Workload says (pure), or None when there is none to read."""
    if workload is None:
        return None
    evicted = _condition(workload, "Evicted")
    waiting = ""
    for type_ in ("QuotaReserved", "Admitted"):
        cond = _condition(workload, type_)
        if cond.get("status") == "False" and cond.get("message"):
            waiting = cond["message"]
            break
    if evicted.get("status") != "True":
        return KueueView(waiting=waiting)
    return KueueView(evicted.get("reason") or "Evicted", evicted.get("message") or "", waiting)
