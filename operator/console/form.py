"""The Launch form: generated from the training spec's JSON schema (the same pydantic model the
CRDs come from), converted to and from the spec document, checked by the same validator as
`kubetune validate`. Pure functions, no I/O, so the round trip form -> YAML -> form is tested
without a browser.

A field's name is its location as the validator reports it (`data.datasets[0].path`), so each
validation message lands next to the field it is about. Parts of a document the form has no
input for (pipelines, mappings) travel in a hidden `_extra` field, so applying a YAML to the form
and back loses nothing."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from kubetune.trainer.api.errors import KubetuneError, SpecError, SpecErrors
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.specfile import validate_training

EXTRA = "_extra"
MAX_DEPTH = 3
SKIPPED = ("pipeline",)
"""Top-level fields edited in the YAML view only (a list of whole stages)."""
SCALARS = ("string", "integer", "number", "boolean")
MAX_ITEMS = 32
"""The most items of one list the form shows (more stay in the YAML view)."""


@dataclass(frozen=True)
class Field:
    """One input: `name` is the validator's location of the value."""

    name: str
    kind: str  # string | integer | number | boolean | enum | list
    label: str
    description: str = ""
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass
class Section:
    title: str
    fields: list[Field] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)
    """Lists of objects in this section (`data.datasets`): their fields are `name[0].*`, and
    `expand` repeats them for as many items as the document has."""


def slug(name: str) -> str:
    """An id-safe form of a field location (`data.datasets[0].path` -> `data-datasets-0-path`)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A property's schema with `$ref` followed and a nullable `anyOf` reduced to its one type."""
    if "$ref" in node:
        target = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    options = [o for o in node.get("anyOf", ()) if o.get("type") != "null"]
    if len(options) == 1:
        merged = {**node, **_resolve(schema, options[0])}
        merged.pop("anyOf", None)
        return merged
    return node


def _kind(node: dict[str, Any]) -> str | None:
    if "enum" in node:
        return "enum"
    kind = node.get("type")
    if kind in SCALARS:
        return kind
    if kind == "array" and node.get("items", {}).get("type") in SCALARS:
        return "list"
    return None


def _walk(schema: dict[str, Any], node: dict[str, Any], prefix: str, section: Section, depth: int) -> None:
    for key, raw in node.get("properties", {}).items():
        prop = _resolve(schema, raw)
        name = f"{prefix}.{key}" if prefix else key
        kind = _kind(prop)
        if kind is not None:
            section.fields.append(Field(name, kind, key, (prop.get("description") or "").strip(),
                                        prop.get("default"), tuple(str(c) for c in prop.get("enum", ()))))
        elif depth < MAX_DEPTH and prop.get("type") == "array" and "$ref" in prop.get("items", {}):
            if "[" not in name:
                section.arrays.append(name)
            _walk(schema, _resolve(schema, prop["items"]), f"{name}[0]", section, depth + 1)
        elif depth < MAX_DEPTH and "properties" in prop:
            _walk(schema, prop, name, section, depth + 1)


def sections(schema: dict[str, Any] | None = None) -> list[Section]:
    """The form's sections: the spec's top-level scalars, then one per nested settings group.
    Any spec's schema: the training spec (default) or a resource's spec (InferenceService)."""
    schema = schema or TrainingSpec.model_json_schema()
    general = Section("general")
    out = [general]
    for key, raw in schema["properties"].items():
        if key in SKIPPED:
            continue
        prop = _resolve(schema, raw)
        if _kind(prop) is not None:
            _walk(schema, {"properties": {key: raw}}, "", general, 0)
        elif "properties" in prop:
            group = Section(key)
            _walk(schema, prop, key, group, 1)
            out.append(group)
        elif prop.get("type") == "array" and "$ref" in prop.get("items", {}):  # a list of objects (adapters)
            group = Section(key)
            _walk(schema, {"properties": {key: raw}}, "", group, 0)
            out.append(group)
    return [s for s in out if s.fields]


def expand(form: list[Section], counts: dict[str, int]) -> list[Section]:
    """The form with each list of objects repeated for `counts[list]` items (one by default):
    `data.datasets[1].path` after `data.datasets[0].*`, and so on."""
    out = []
    for section in form:
        fields = list(section.fields)
        for prefix in section.arrays:
            head = f"{prefix}[0]"
            group = [f for f in section.fields if f.name.startswith(head)]
            if counts.get(prefix, 1) > 1 and group:
                at = fields.index(group[-1]) + 1
                fields[at:at] = [replace(f, name=f"{prefix}[{i}]{f.name[len(head):]}")
                                 for i in range(1, counts[prefix]) for f in group]
        out.append(Section(section.title, fields, section.arrays))
    return out


def counts_of_document(document: dict[str, Any], form: list[Section]) -> dict[str, int]:
    """How many items each list of objects has in a document."""
    counts = {}
    for prefix in (p for s in form for p in s.arrays):
        items = _get(document, _parts(prefix))
        if isinstance(items, list) and items:  # past MAX_ITEMS, items stay in `_extra`
            counts[prefix] = min(MAX_ITEMS, len(items))
    return counts


def counts_of_values(values: dict[str, str], form: list[Section], add: str | None = None) -> dict[str, int]:
    """How many items each list of objects has in a form's values (its highest index), one more
    for the list named by `add` (the "add" button)."""
    counts = {}
    for prefix in (p for s in form for p in s.arrays):
        found = [int(m.group(1)) for key in values if (m := re.match(re.escape(prefix) + r"\[(\d+)\]\.", key))]
        counts[prefix] = min(MAX_ITEMS, max(found, default=0) + 1 + (add == prefix))
    return counts


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(name: str) -> list[str | int]:
    return [int(index) if index else key for key, index in _PART.findall(name)]


def _get(document: Any, parts: list[str | int]) -> Any:
    for part in parts:
        if isinstance(part, int):
            if not isinstance(document, list) or part >= len(document):
                return None
        elif not isinstance(document, dict):
            return None
        document = document[part] if isinstance(part, int) else document.get(part)
    return document


def _pop(document: Any, parts: list[str | int]) -> None:
    parent = _get(document, parts[:-1])
    if isinstance(parent, dict):
        parent.pop(parts[-1], None)


def _set(document: dict[str, Any], parts: list[str | int], value: Any) -> None:
    node: Any = document
    for part, following in itertools.pairwise(parts):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(part, int):
            while len(node) <= part:
                node.append({} if not isinstance(following, int) else [])
            node = node[part]
        else:
            node = node.setdefault(part, empty)
    last = parts[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _text(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind == "list":
        return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if kind == "boolean":
        return "true" if value is True else "false" if value is False else str(value)
    return str(value)


def _value(kind: str, text: str) -> Any:
    """A form string as the YAML a user would write: numbers as numbers, lists split on commas.
    A value of the wrong type stays a string, so the validator's own message reports it."""
    if kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind in ("integer", "number", "boolean"):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        ok = isinstance(parsed, bool) if kind == "boolean" else isinstance(parsed, int | float) and not isinstance(parsed, bool)
        return parsed if ok else text
    return text


def document_to_form(document: dict[str, Any], form: list[Section] | None = None) -> dict[str, str]:
    """The form's values for a spec document, with what no field shows kept under `_extra`."""
    form = form or sections()
    rest = json.loads(json.dumps(document))
    values: dict[str, str] = {}
    for f in (f for s in form for f in s.fields):
        parts = _parts(f.name)
        value = _get(document, parts)
        if value is None or isinstance(value, dict) or (isinstance(value, list) and f.kind != "list"):
            continue
        values[f.name] = _text(f.kind, value)
        _pop(rest, parts)
    values[EXTRA] = json.dumps(_prune(rest)) if _prune(rest) else ""
    return values


def _prune(node: Any) -> Any:
    """Drop the empty mappings left once the form's fields are taken out."""
    if isinstance(node, dict):
        pruned = {k: _prune(v) for k, v in node.items()}
        return {k: v for k, v in pruned.items() if v != {}}
    if isinstance(node, list):
        items = [_prune(v) for v in node]
        return {} if all(v == {} for v in items) else items
    return node


def form_to_document(values: dict[str, str], form: list[Section] | None = None,
                     order: list[str] | None = None) -> dict[str, Any]:
    """The spec document a form describes: only the fields the user filled, as they wrote them."""
    form = form or sections()
    try:
        document = json.loads(values.get(EXTRA) or "{}")
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    for f in (f for s in form for f in s.fields):
        text = (values.get(f.name) or "").strip()
        if text:
            _set(document, _parts(f.name), _value(f.kind, text))
    return _order(document, order or list(TrainingSpec.model_json_schema()["properties"]))


def _order(document: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Top-level keys in the schema's order, as in the README's examples."""
    return dict(sorted(document.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def check(document: dict[str, Any]) -> tuple[TrainingSpec | None, list[SpecError]]:
    """The spec and no errors, or None and the validator's field-level errors."""
    try:
        return validate_training(document), []
    except SpecErrors as exc:
        return None, exc.errors
    except SpecError as exc:
        return None, [exc]
    except KubetuneError as exc:
        return None, [SpecError("", str(exc))]


def check_resource(kind: str, document: dict[str, Any], name: str) -> tuple[Any, list[SpecError]]:
    """A resource's spec (InferenceService) checked as the operator checks it, errors named by
    their field in the spec (`model.path`, as the form names it)."""
    from kubetune.operator.validation import validate_resource

    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "metadata": {"name": name or "unnamed"},
                "spec": document}
    try:
        return validate_resource(manifest, f"{kind}/{name}"), []
    except SpecErrors as exc:
        return None, [SpecError(e.field.removeprefix("spec."), e.problem, e.fix) for e in exc.errors]


def errors_by_field(errors: list[SpecError], form: list[Section]) -> tuple[dict[str, str], list[str]]:
    """Messages keyed by the form field they are about; the rest (cross-field checks) apart."""
    names = {f.name for s in form for f in s.fields}
    by_field: dict[str, str] = {}
    general: list[str] = []
    for error in errors:
        text = error.problem + (f" Fix: {error.fix}" if error.fix else "")
        if error.field in names:
            by_field[error.field] = (by_field[error.field] + " " + text) if error.field in by_field else text
        else:
            general.append(str(error))
    return by_field, general


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def from_yaml(text: str, key: str | None = "training") -> dict[str, Any]:
    """A YAML document from the YAML view; a training spec or a job manifest's spec.training
    (`key`; None: a resource's spec, or the manifest's spec)."""
    try:
        document = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SpecError("(yaml)", f"is not valid YAML: {str(exc).splitlines()[0]}", "fix the YAML syntax.") from None
    if isinstance(document, dict) and isinstance(document.get("spec"), dict) and (key is None or key in document["spec"]):
        document = document["spec"][key] if key else document["spec"]
    if not isinstance(document, dict):
        raise SpecError("(yaml)", "is not a mapping of training settings.", "write `key: value` lines.")
    return document


async def read_form(request: Any) -> dict[str, str]:
    """A request's urlencoded form body (what htmx and the pages send), parsed without
    python-multipart; the size bound is the app's middleware's."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl((await request.body()).decode(errors="replace"), keep_blank_values=True))
