"""The vocabulary of a decision, shared by every kind: the plan (objects to create, patch and
delete, the new status, the events), the phase/condition rules that fill it, and the status
merge patch. Pure data and functions: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.status import set_condition
from kubetune.trainer.api.errors import cap_message


@dataclass
class Event:
    type: str
    reason: str
    message: str


@dataclass
class Plan:
    """What a decision asks for; `apply.apply_plan` carries it out. Every kind uses the same
    shape (a training job never deletes and has no API key, so those stay empty)."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    """(kind, name, merge patch) for existing children."""
    delete: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of children to delete (absent ones are fine)."""
    events: list[Event] = field(default_factory=list)
    api_key_secret: dict[str, Any] | None = None
    """A generated API key's Secret to create if absent, without data: `apply` adds a fresh
    random key under `api_key_field` in the create call only."""
    api_key_field: str = "api-key"


class StatusDecisions:
    """Phase transitions (with their events) and conditions, shared by the training and serving
    reconcilers. Subclasses set `status`, `plan` (with `.events`), `ts` and `generation`."""

    status: dict[str, Any]
    plan: Any
    ts: str
    generation: Any

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, cap_message(message)))

    def transition(self, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        """Set the phase; an event is posted when the phase or its reason changes. Messages are
        capped (`cap_message`): they may echo spec values of any size."""
        message = cap_message(message)
        if self.status.get("phase") != phase or self.status.get("reason") != reason:
            self.event(event_type, reason, message)
        self.status.update(phase=phase, reason=reason, message=message)

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> bool:
        return set_condition(self.status, type_, value, reason, message, now=self.ts, generation=self.generation)


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch turning status `old` into `new` (None for removed keys), or None when
    nothing changed."""
    old = old or {}
    if old == new:
        return None
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(before, dict) and isinstance(value, dict):
            patch[key] = status_patch(before, value)
        else:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
