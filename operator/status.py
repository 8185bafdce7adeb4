"""Status vocabulary of the training kinds: phases, conditions, and progress from status.json.

Pure helpers (dicts in, dicts out) except `read_trainer_status`, which reads the trainer's
`status.json` from the output location through `kubetune.trainer.artifacts`.
"""

from __future__ import annotations

import datetime
import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from kubetune.trainer.api.errors import MESSAGE_LIMIT, cap_message, shorten

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
QUEUED = "Queued"
"""Waiting for Kueue to admit the Job (or re-admit it after a preemption)."""

# Condition types.
SPEC_VALID = "SpecValid"
"""The spec passed validation (False: InvalidSpec, TrainingSpecImmutable)."""
READY_TO_START = "DependenciesReady"
"""Secrets and referenced jobs are available (False: SecretNotFound, WaitingForReference, ...)."""
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
"""Reason of a resource refused by the memory check (a job that cannot fit, a model that cannot start)."""
COND_RUNNING = "Running"
COND_SUSPENDED = "Suspended"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SYNCED = "Synced"
"""False (reason Forbidden) while the operator's RBAC refuses a call it needs for the resource."""


def now_iso(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return now.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError, AttributeError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


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
    message = cap_message(message, MESSAGE_LIMIT)
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


# -- summary conditions: kstatus (Flux, `kubectl wait`), Argo CD -----------------------------

COND_READY, COND_RECONCILING, COND_STALLED = "Ready", "Reconciling", "Stalled"


def summary_conditions(status: dict[str, Any], kind: str, *, now: str, generation: int | None = None) -> None:
    """The conditions tools read without knowing kubetune: `Reconciling` while the resource
    works towards its goal, `Stalled` when it stopped short of it (Failed), and for the training
    kinds `Ready` once Succeeded (an InferenceService sets its own `Ready`: a replica serves), so
    `kubectl wait --for=condition=Ready`, kstatus (Flux, kpt) and Argo CD agree with the phase."""
    phase, reason, message = status.get("phase"), status.get("reason") or "", status.get("message") or ""
    failed, settled = phase == "Failed", phase in ("Succeeded", "Suspended", "Failed")
    if kind == "InferenceService":
        rolling = condition_is(status, "Progressing", "True")
        settled = failed or (phase == "Ready" and not rolling)
    else:
        set_condition(status, COND_READY, phase == "Succeeded", reason or (phase or "Pending"),
                      message if phase != "Succeeded" else "", now=now, generation=generation)
    set_condition(status, COND_STALLED, failed, reason if failed else "NotStalled", message if failed else "",
                  now=now, generation=generation)
    set_condition(status, COND_RECONCILING, not settled, (reason or phase or "Pending") if not settled else "Settled",
                  message if not settled else "", now=now, generation=generation)


# -- the trainer's status.json: untrusted input ------------------------------------------------

STATE_LIMIT = 64
"""Characters kept of the trainer's free-text state."""
URI_LIMIT = 1024
"""Longest location (lastCheckpoint, outputUri) accepted from status.json."""
MAX_STEPS = 10**12
LATEST_TIMESTAMP = 4_102_444_800  # 2100-01-01: a later updatedAt is a bug, not a time
_Count = Annotated[int, Field(ge=0, le=MAX_STEPS)]
_Real = Annotated[float, Field(ge=-1e12, le=1e12, allow_inf_nan=False)]
_Rate = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]


class TrainerReport(BaseModel):
    """What the operator accepts from the trainer's status.json. The file is written by the
    training pod, i.e. by user code: every field is checked for type and bounds (so a value
    like `1e20` or `10**400` cannot crash a reconcile), strings are cut, locations are checked
    against the job's own output location. Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    step: _Count | None = None
    totalSteps: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = None
    maxSteps: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = None
    epoch: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = None
    loss: _Real | None = None
    evalLoss: _Real | None = None
    tokensPerSecond: _Rate | None = None
    etaSeconds: Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)] | None = None
    lastCheckpoint: Annotated[str, StringConstraints(max_length=URI_LIMIT, pattern=r"^[^\s-][^\s]*$")] | None = None
    phase: str | None = None
    state: str | None = None
    updatedAt: Annotated[float, Field(ge=0, le=LATEST_TIMESTAMP, allow_inf_nan=False)] | Annotated[
        str, StringConstraints(max_length=64)] | None = None
    outputUri: Annotated[str, StringConstraints(max_length=URI_LIMIT, pattern=r"^[^\s-][^\s]*$")] | None = None

    @field_validator("step", "totalSteps", "maxSteps", "epoch", "loss", "evalLoss", "tokensPerSecond",
                     "etaSeconds", mode="before")
    @classmethod
    def _number(cls, value: Any, info: ValidationInfo) -> Any:
        """Numbers only (`true` is not a step); counts may arrive as whole floats (`40.0`)."""
        if isinstance(value, bool) or not isinstance(value, int | float | None):
            raise ValueError("not a number")
        if info.field_name in ("step", "totalSteps", "maxSteps") and isinstance(value, float) \
                and math.isfinite(value) and value.is_integer() and abs(value) <= MAX_STEPS:
            return int(value)
        return value

    @field_validator("phase", "state", mode="before")
    @classmethod
    def _short_text(cls, value: Any) -> Any:
        return value[:STATE_LIMIT] if isinstance(value, str) else value

    @property
    def updated_timestamp(self) -> float | None:
        if isinstance(self.updatedAt, float):
            return self.updatedAt
        parsed = parse_time(self.updatedAt)
        stamp = parsed.timestamp() if parsed else None
        return stamp if stamp is not None and 0 <= stamp <= LATEST_TIMESTAMP else None


def _under(location: str, root: str) -> bool:
    root = root.rstrip("/")
    return bool(root) and (location.rstrip("/") == root or location.startswith(root + "/"))


def parse_trainer_status(data: Any, output_location: str | None) -> tuple[TrainerReport, list[str]]:
    """The trainer's status.json as a `TrainerReport` plus notes on what was dropped. Never
    raises: a field of the wrong type or out of bounds is left out (with a note), and an
    `outputUri` outside the job's own output location (`output_location`) is ignored, so a
    job cannot point the status (and the services that read it) somewhere else."""
    raw = dict(data) if isinstance(data, dict) else {}
    notes: list[str] = []
    for _ in range(len(TrainerReport.model_fields) + 1):
        try:
            report = TrainerReport.model_validate(raw)
            break
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                key = str(err["loc"][0]) if err["loc"] else "?"
                raw.pop(key, None)
                notes.append(f"{cap_message(key, 64)}: {err['msg']}")
    else:  # pragma: no cover - every round drops at least one field
        report = TrainerReport()
    if report.outputUri and not (output_location and _under(report.outputUri, output_location)):
        notes.append(f"outputUri: {shorten(report.outputUri, 100)} is not under the job's output location")
        report = report.model_copy(update={"outputUri": None})
    return report, sorted(set(notes))[:MAX_NOTES]


MAX_NOTES = 10


def progress_from_trainer(data: Any, output_location: str | None = None) -> dict[str, Any]:
    """The `status.progress` block from the trainer's status.json (unknown keys ignored, bad
    ones dropped and listed in `ignored`, missing ones left out; percent derived from
    step/totalSteps)."""
    report, notes = parse_trainer_status(data, output_location)
    return progress_of(report, notes)


def progress_of(report: TrainerReport, notes: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    step, total = report.step, report.totalSteps or report.maxSteps
    if step is not None:
        out["step"] = step
    if total is not None:
        out["totalSteps"] = total
        if step is not None:
            out["percent"] = round(min(100.0, 100.0 * step / total), 1)
    for key in ("epoch", "loss", "evalLoss", "tokensPerSecond", "etaSeconds"):
        value = getattr(report, key)
        if value is not None:
            out[key] = round(value, 6)
    if report.lastCheckpoint:
        out["lastCheckpoint"] = report.lastCheckpoint
    if report.phase or report.state:
        out["state"] = report.phase or report.state
    updated = report.updated_timestamp
    if updated is not None:
        out["updatedAt"] = now_iso(datetime.datetime.fromtimestamp(updated, datetime.UTC))
    if notes:
        out["ignored"] = [cap_message(n, 200) for n in notes]
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
    from kubetune.trainer.api.spec import StorageSpec

    settings = storage if isinstance(storage, StorageSpec) else StorageSpec()
    return settings.model_copy(update={"maxAttempts": STATUS_READ_ATTEMPTS})


def read_trainer_status(output_uri: str, storage: Any = None) -> dict[str, Any] | None:
    """The trainer's status.json under `output_uri` (local path or s3://), or None when it does
    not exist (yet) or cannot be read. Never raises, and gives up quickly (`STATUS_READ_ATTEMPTS`,
    `STATUS_READ_CONNECT_TIMEOUT_S`, `STATUS_READ_TIMEOUT_S`):
    progress is best effort, and the next observation reads it again."""
    from kubetune.trainer.artifacts.output import read_status

    return read_status(output_uri, status_read_settings(storage),
                       connect_timeout=STATUS_READ_CONNECT_TIMEOUT_S, read_timeout=STATUS_READ_TIMEOUT_S)
