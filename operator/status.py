"""Status vocabulary of the training kinds: phases, conditions, and progress from status.json.

Pure helpers (dicts in, dicts out) except `read_trainer_status`, which reads the trainer's
`status.json` from the output location through `kubetune.trainer.storage`.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"

# Condition types.
SPEC_VALID = "SpecValid"
"""The spec passed validation (False: InvalidSpec, TrainingSpecImmutable)."""
READY_TO_START = "DependenciesReady"
"""Secrets and referenced jobs are available (False: SecretNotFound, WaitingForReference, ...)."""
COND_RUNNING = "Running"
COND_SUSPENDED = "Suspended"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"


def now_iso(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return now.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def get_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def condition_is(status: dict[str, Any], type_: str, value: str = "True") -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.get("status") == value


def set_condition(
    status: dict[str, Any],
    type_: str,
    value: bool | str,
    reason: str,
    message: str = "",
    *,
    now: str,
    generation: int | None = None,
) -> bool:
    """Set a condition in place; lastTransitionTime moves only when the status flips.
    Returns True when the condition's status or reason changed (worth an event)."""
    text = value if isinstance(value, str) else ("True" if value else "False")
    conditions = [dict(c) for c in status.get("conditions") or []]
    for cond in conditions:
        if cond.get("type") == type_:
            changed = cond.get("status") != text or cond.get("reason") != reason
            if cond.get("status") != text:
                cond["lastTransitionTime"] = now
            cond.update({"status": text, "reason": reason, "message": message})
            if generation is not None:
                cond["observedGeneration"] = generation
            status["conditions"] = conditions
            return changed
    cond = {"type": type_, "status": text, "reason": reason, "message": message, "lastTransitionTime": now}
    if generation is not None:
        cond["observedGeneration"] = generation
    conditions.append(cond)
    status["conditions"] = conditions
    return True


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def progress_from_trainer(data: dict[str, Any]) -> dict[str, Any]:
    """The `status.progress` block from the trainer's status.json (unknown keys ignored,
    missing ones left out; percent derived from step/totalSteps)."""
    out: dict[str, Any] = {}
    step, total = _number(data.get("step")), _number(data.get("totalSteps") or data.get("maxSteps"))
    if step is not None:
        out["step"] = int(step)
    if total is not None and total > 0:
        out["totalSteps"] = int(total)
        if step is not None:
            out["percent"] = round(min(100.0, 100.0 * step / total), 1)
    for key in ("epoch", "loss", "evalLoss", "tokensPerSecond", "etaSeconds"):
        value = _number(data.get(key))
        if value is not None:
            out[key] = round(value, 6)
    if isinstance(data.get("lastCheckpoint"), str):
        out["lastCheckpoint"] = data["lastCheckpoint"]
    if isinstance(data.get("phase") or data.get("state"), str):
        out["state"] = data.get("phase") or data.get("state")
    updated = data.get("updatedAt")
    if isinstance(updated, int | float) and not isinstance(updated, bool):
        out["updatedAt"] = now_iso(datetime.datetime.fromtimestamp(updated, datetime.UTC))
    elif isinstance(updated, str):
        out["updatedAt"] = updated
    return out


STATUS_READ_ATTEMPTS = 1
"""`StorageSpec.maxAttempts` when the operator reads status.json (botocore's `max_attempts`, which
counts retries: one request and at most one retry). The read runs inside a reconcile, holding
that resource's lock (Job events for it wait), so it must be quick; a failed read is simply
repeated at the next observation (KUBETUNE_RECONCILE_INTERVAL), never by sleeping through the
storage layer's default backoff (8 adaptive retries: seconds to a minute per read against an
unreachable or throttling endpoint)."""


STATUS_READ_CONNECT_TIMEOUT_S = 2.0
STATUS_READ_TIMEOUT_S = 5.0
"""Socket timeouts (seconds, per request) of the status read, for the same reason: the storage
layer's defaults (10 s to connect, 60 s to read) suit transfers, and would hold the reconcile for
a minute or more against an endpoint that accepts connections and never answers (or drops them)."""


def status_read_settings(storage: Any = None) -> Any:
    """`storage` (a StorageSpec, or None for the defaults) with the fewest retries, for the
    best-effort status read."""
    from kubetune.trainer.spec import StorageSpec

    settings = storage if isinstance(storage, StorageSpec) else StorageSpec()
    return settings.model_copy(update={"maxAttempts": STATUS_READ_ATTEMPTS})


def read_trainer_status(output_uri: str, storage: Any = None) -> dict[str, Any] | None:
    """The trainer's status.json under `output_uri` (local path or s3://), or None when it does
    not exist (yet) or cannot be read. Never raises, and gives up quickly (`STATUS_READ_ATTEMPTS`,
    `STATUS_READ_CONNECT_TIMEOUT_S`, `STATUS_READ_TIMEOUT_S`):
    progress is best effort, and the next observation reads it again."""
    from kubetune.trainer.storage.output import read_status

    return read_status(output_uri, status_read_settings(storage),
                       connect_timeout=STATUS_READ_CONNECT_TIMEOUT_S, read_timeout=STATUS_READ_TIMEOUT_S)
