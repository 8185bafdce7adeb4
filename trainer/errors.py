"""User-facing errors: one paragraph naming the field and the fix, exit code 2, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

EXIT_CONFIG_ERROR = 2
"""Exit code for bad input. The operator's podFailurePolicy fails a job fast on it: a retry
cannot fix a wrong spec."""


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
        else:
            out += f".{part}" if out else str(part)
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
                SpecError(field, f"{err['input']!r} is not a valid choice.", f"use one of {expected}.")
            )
        elif kind == "value_error":
            errors.append(SpecError(field, str(err.get("ctx", {}).get("error", err["msg"])) + "."))
        else:
            shown = err.get("input")
            got = "" if isinstance(shown, dict | list) else f" (got {shown!r})"
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
            lines = "\n".join(f"  - {e}" for e in self.errors)
            text = f"Invalid spec{where} ({len(self.errors)} problems):\n{lines}"
        super().__init__(text)
