"""User-facing errors: one paragraph naming the field and the fix, exit code 2, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

EXIT_CONFIG_ERROR = 2
"""Exit code for bad input. The operator's podFailurePolicy fails a job fast on it: a retry
cannot fix a wrong spec."""


ECHO_LIMIT = 200
"""Characters of a user-supplied value echoed back in a message (`shorten`)."""
MESSAGE_LIMIT = 2000
"""Characters of one message stored or sent elsewhere: a status message, a condition, an event,
an admission denial (`cap_message`). Kubernetes objects are limited to ~1.5 MB in all, and a
100 KB spec value echoed into the status, its conditions and its events would approach it."""
MAX_LISTED_PROBLEMS = 20
"""Problems listed one by one in a SpecErrors message; the rest are counted."""


def shorten(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` cut to about `limit` characters, saying how much was left out. Every
    message that echoes input back (a wrong enum value, an unknown key) goes through this,
    so a huge value cannot make a huge message (or a status patch over the object limit)."""
    return cap_message(repr(value), limit)


def cap_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` cut to `limit` characters (with a note of how many were left out)."""
    text = str(text)
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


class KubetuneError(Exception):
    """An error whose message is meant for the user as-is."""

    exit_code = 1


class SpecError(KubetuneError):
    """The spec (or something it points at) is wrong; the message names the field and the fix."""

    exit_code = EXIT_CONFIG_ERROR

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        text = f"{field}: {problem}" if field else problem
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):
        # Picklable, so an error raised in a datasets worker process reaches the user intact.
        return (type(self), (self.field, self.problem, self.fix))

    def prefixed(self, prefix: str) -> SpecError:
        """The same error with its field located inside a larger document (`spec.training`)."""
        if not prefix:
            return self
        return SpecError(f"{prefix}.{self.field}" if self.field else prefix, self.problem, self.fix)


def format_location(loc: Sequence[str | int], prefix: str = "") -> str:
    """`('data', 'datasets', 0, 'path')` -> `data.datasets[0].path`."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:  # a key may come from the input (an unknown field): keep it short
            part = cap_message(str(part), ECHO_LIMIT)
            out += f".{part}" if out else part
    return out or "(spec)"


def _known_fields(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names valid at `loc` (the parent of an unknown key), for 'did you mean'."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _inner_model(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}).keys())


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def validation_error_to_spec_errors(
    exc: ValidationError, model: type[BaseModel], prefix: str = ""
) -> list[SpecError]:
    """Turn pydantic's errors into field-named messages with a concrete fix."""
    errors: list[SpecError] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        field = format_location(loc, prefix)
        if kind == "extra_forbidden":
            parent, name = loc[:-1], str(loc[-1])
            known = _known_fields(model, parent)
            camel = _to_camel(name)
            guess = [camel] if camel in known else difflib.get_close_matches(name, known, n=1)
            fix = f"did you mean `{guess[0]}`?" if guess else "remove it"
            if known:
                fix += f" Valid fields here: {', '.join(known)}."
            errors.append(SpecError(field, "unknown field.", fix))
        elif kind == "missing":
            errors.append(SpecError(field, "is required but missing.", "add it to the spec."))
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            errors.append(
                SpecError(field, f"{shorten(err['input'])} is not a valid choice.", f"use one of {expected}.")
            )
        elif kind == "value_error":
            problem = cap_message(str(err.get("ctx", {}).get("error", err["msg"])), 4 * ECHO_LIMIT)
            errors.append(SpecError(field, problem + "."))
        else:
            shown = err.get("input")
            got = "" if isinstance(shown, dict | list) else f" (got {shorten(shown)})"
            errors.append(SpecError(field, f"{err['msg']}{got}.", None))
    return errors


class SpecErrors(KubetuneError):
    """Several spec problems reported together, so a user fixes them in one pass."""

    exit_code = EXIT_CONFIG_ERROR

    def __init__(self, errors: Iterable[SpecError], source: str | None = None):
        self.errors = list(errors)
        where = f" in {source}" if source else ""
        if len(self.errors) == 1:
            text = f"Invalid spec{where}: {self.errors[0]}"
        else:
            listed: list[str] = []
            for error in self.errors[:MAX_LISTED_PROBLEMS]:
                line = f"  - {error}"
                if listed and sum(len(x) + 1 for x in listed) + len(line) > MESSAGE_LIMIT - 200:
                    break  # the rest is counted: the whole message must fit a status field
                listed.append(line)
            lines = "\n".join(listed)
            if len(self.errors) > len(listed):
                lines += f"\n  - ... and {len(self.errors) - len(listed)} more"
            text = f"Invalid spec{where} ({len(self.errors)} problems):\n{lines}"
        super().__init__(text)
