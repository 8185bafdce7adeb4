"""CRD generation: the custom resources' pydantic models (`resources.py`) -> structural OpenAPI
schemas with CEL rules -> apiextensions.k8s.io/v1 CustomResourceDefinitions (`kubetune crds`).

The one source of the files in `crds/` (the chart's `crds/` links to them); a test fails when
they are stale.
"""

from __future__ import annotations

import copy
from typing import Any, get_args

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import to_jsonable_python

from kubetune.operator.resources import (
    ALIGNMENT_STAGES,
    CATEGORY,
    GROUP,
    KINDS,
    VERSION,
    KindInfo,
)
from kubetune.trainer.api import spec as trainer_spec


class _Generator(GenerateJsonSchema):
    """Emit defaults from default factories too (`{}` for nested blocks, so the API server
    applies their own defaults recursively)."""

    def get_default_value(self, schema: Any) -> Any:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            value = schema["default_factory"]()
            return {} if isinstance(value, BaseModel) else to_jsonable_python(value)
        return super().get_default_value(schema)


_DROP_KEYS = {"title", "$defs", "discriminator", "examples"}


def _exclusive_bounds(node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema 2020 exclusive bounds -> OpenAPI v3's boolean form, or a CEL rule.

    The API server compares an integer value (`0`, and a default `0.0` reaches it as `0`) with a
    bound truncated to an integer, so `exclusiveMaximum: 0.5` refuses `0` ("less than 0") and
    the whole CRD is refused for its default. A fractional exclusive bound is therefore checked
    by CEL, where a `number` field is always a double.
    """
    rules = []
    for bound, plain, op in (("exclusiveMinimum", "minimum", ">"), ("exclusiveMaximum", "maximum", "<")):
        value = node.get(bound)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if float(value).is_integer():
            node[plain] = int(value) if node.get("type") == "integer" else value
            node[bound] = True
        else:
            node.pop(bound)
            rules.append({"rule": f"self {op} {value!r}", "message": f"must be {op} {value!r}"})
    if rules:
        node["x-kubernetes-validations"] = [*node.get("x-kubernetes-validations", []), *rules]
    return node


_ONE_SOURCE = {"rule": "has(self.uri) != has(self.fromJob)", "message": "set exactly one of uri or fromJob"}
_ALIGNMENT_STAGES = [s for s in ALIGNMENT_STAGES if s in get_args(trainer_spec.Stage)]
_ALIGNMENT_STAGES_CEL = "[" + ", ".join(f"'{s}'" for s in _ALIGNMENT_STAGES) + "]"
_ROLLOUT_STAGES_CEL = "[" + ", ".join(f"'{s}'" for s in trainer_spec.ROLLOUT_STAGES) + "]"

CEL_RULES: dict[str, list[dict[str, str]]] = {
    # -- InferenceService (InferenceServiceSpec._serving_rules, ModelSource, ModelRef, ModelCache)
    "InferenceServiceSpec": [
        {"rule": "!has(self.maxReplicas) || self.maxReplicas >= self.minReplicas",
         "message": "maxReplicas is below minReplicas",
         "fieldPath": ".maxReplicas"},
        {"rule": "self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
         "message": "adapter names must be unique", "fieldPath": ".adapters"},
        {"rule": "!has(self.model.name) || self.adapters.all(a, a.name != self.model.name)",
         "message": "an adapter has the base model's name (spec.model.name)", "fieldPath": ".adapters"},
        {"rule": "!has(self.tensorParallelSize) || self.gpus == 0 "
                 "|| self.tensorParallelSize <= self.gpus",
         "message": "tensorParallelSize exceeds gpus",
         "fieldPath": ".tensorParallelSize"},
        {"rule": "!has(self.maxReplicas) || self.maxReplicas <= self.minReplicas "
                 "|| self.autoscaling.metric != 'cpu' || 'cpu' in self.resources.requests",
         "message": "autoscaling on cpu needs resources.requests.cpu (utilization is relative to it)",
         "fieldPath": ".autoscaling.metric"},
        {"rule": "self.minReplicas != 0 || has(self.maxReplicas)",
         "message": "minReplicas 0 (scale to zero) needs maxReplicas", "fieldPath": ".maxReplicas"},
        {"rule": "self.minReplicas != 0 || self.autoscaling.metric != 'cpu'",
         "message": "minReplicas 0 cannot scale on cpu: use autoscaling.metric requestsInFlight or queueDepth",
         "fieldPath": ".autoscaling.metric"},
    ],
    "ServedModel": [_ONE_SOURCE],
    "AdapterSource": [_ONE_SOURCE],
    "ModelRef": [{"rule": "has(self.fineTuneJob) != has(self.alignmentJob)",
                  "message": "set exactly one of fineTuneJob or alignmentJob"}],
    "ModelCache": [
        {"rule": "!has(self.type) || self.type != 'pvc' || has(self.claimName)",
         "message": "cache type pvc needs claimName"},
        {"rule": "(has(self.type) && self.type == 'pvc') || !has(self.claimName)",
         "message": "claimName is only for cache type pvc", "fieldPath": ".claimName"},
        {"rule": "(has(self.type) && self.type == 'hostPath') || !has(self.subPath)",
         "message": "subPath is only for cache type hostPath", "fieldPath": ".subPath"},
    ],
    # -- AlignmentJob (AlignmentJobSpec._alignment_rules)
    "AlignmentJobSpec": [
        {"rule": f"self.training.stage in {_ALIGNMENT_STAGES_CEL}",
         "messageExpression": f"'an AlignmentJob runs an alignment stage ({', '.join(_ALIGNMENT_STAGES)}), not ' + "
                              "self.training.stage + '; use a FineTuneJob for it'",
         "fieldPath": ".training.stage"},
        {"rule": "!has(self.baseModelFrom) || !has(self.training.model) || !has(self.training.model.path)",
         "message": "set either training.model.path or baseModelFrom, not both", "fieldPath": ".baseModelFrom"},
        {"rule": "!has(self.rewardModelFrom) || !has(self.training.reward.model)",
         "message": "set either training.reward.model or rewardModelFrom, not both", "fieldPath": ".rewardModelFrom"},
        {"rule": f"!has(self.rewardModelFrom) || self.training.stage in {_ROLLOUT_STAGES_CEL}",
         "message": f"rewardModelFrom is for the stages that score generations ({', '.join(trainer_spec.ROLLOUT_STAGES)})",
         "fieldPath": ".rewardModelFrom"},
    ],
    # -- the trainer's spec (kubetune/trainer/api/spec.py)
    "DeepSpeedSpec": [{"rule": "!has(self.offloadParams) || !self.offloadParams || (has(self.stage) && self.stage == 3)",
                       "message": "offloadParams needs stage 3: ZeRO-1/2 do not partition parameters",
                       "fieldPath": ".offloadParams"}],
    "RewardSpec": [{"rule": "!has(self.model) || !has(self.function)",
                    "message": "set reward.model or reward.function, not both"}],
    "FreezeSpec": [{"rule": "!has(self.trainableLayers) || self.trainableLayers != 0 || "
                             "(has(self.trainableModules) && size(self.trainableModules) > 0)",
                    "message": "freeze leaves nothing trainable: set trainableLayers to a non-zero number or list "
                               "trainableModules"}],
}
"""Cross-field rules of the models (their `model_validator`s) as CEL `x-kubernetes-validations`,
by model name: the API server refuses such an object itself, with or without the operator's
webhook (which says the same in `kubetune validate`'s words, and checks what CEL cannot: local
dataset paths, the GPU memory estimate, spec.training after the start, ...). The server also runs
each rule on the schema's `default` of the block (`{}`, before its own fields' defaults), so a
rule on a block with a default reads its fields through `has()`."""


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """JSON Schema from pydantic -> a Kubernetes structural schema (OpenAPI v3 subset)."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # Inline references; the field's own description/default win over the model's.
    if "$ref" in node:
        name = node.pop("$ref").split("/")[-1]
        target = copy.deepcopy(defs[name])
        node = {**target, **node}
        node = _with_cel_rules(node, name)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = {**_structural(inner, defs), **node}
    # `X | None` -> X with nullable: true.
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and any(o == {"type": "null"} for o in options):
            rest = [o for o in options if o != {"type": "null"}]
            node.pop(key)
            if len(rest) == 1:
                node = {**_structural(rest[0], defs), **node}
            else:
                node[key] = rest
            node["nullable"] = True
    if node.get("default", 0) is None:
        node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node = _exclusive_bounds(node)
    extra = node.get("additionalProperties")
    if extra is False:
        node.pop("additionalProperties")
    elif extra is True or extra == {}:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("description"):
        node["description"] = " ".join(node["description"].split())
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    untyped = not any(out.get(k) for k in ("type", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"))
    if untyped and "properties" in out:
        out["type"] = "object"
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model (references inlined, nullable, defaults)."""
    raw = model.model_json_schema(schema_generator=_Generator)
    return _structural(_with_cel_rules(raw, model.__name__), raw.get("$defs", {}))


def _with_cel_rules(node: dict[str, Any], model_name: str) -> dict[str, Any]:
    rules = CEL_RULES.get(model_name)
    if not rules:
        return node
    return {**node, "x-kubernetes-validations": [*node.get("x-kubernetes-validations", []), *copy.deepcopy(rules)]}


CORE_V1_VOLUME = "core-v1-volume.json"
"""Kubernetes' own core/v1 Volume schema, structural (generated by `python -m tests.k8s_schemas`)."""


def _with_core_schemas(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec.podTemplate.spec.volumes` items get the real core/v1 Volume schema, so the API server
    checks a volume source's fields at `kubectl apply` as it does a pod's (the model only checks
    the name and that there is one source)."""
    import json
    from importlib import resources

    pod = ((spec.get("properties") or {}).get("podTemplate") or {}).get("properties", {}).get("spec")
    if pod is None:
        return spec
    volume = json.loads(resources.files("kubetune.operator").joinpath(CORE_V1_VOLUME).read_text())
    pod["properties"]["volumes"]["items"] = volume
    return spec


def _open_schema(info: KindInfo) -> dict[str, Any]:
    spec = _with_core_schemas(structural_schema(info.spec_model))
    if info.kind == "AlignmentJob":
        # With baseModelFrom, training.model.path is filled in by the operator.
        model = spec["properties"]["training"]["properties"]["model"]
        model["required"] = [r for r in model.get("required", []) if r != "path"] or None
        if model["required"] is None:
            model.pop("required")
        training = spec["properties"]["training"]
        training["required"] = [r for r in training.get("required", []) if r != "model"]
        if not training["required"]:
            training.pop("required")
    status = structural_schema(info.status_model)
    return {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(kind: str) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of a kind."""
    info = KINDS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": info.crd_name,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, **({"scale": dict(info.scale)} if info.scale else {})},
                    "additionalPrinterColumns": copy.deepcopy(info.printer_columns),
                    "schema": {"openAPIV3Schema": _open_schema(info)},
                }
            ],
        },
    }


GENERATED_HEADER = "# Generated by `kubetune crds` from kubetune/operator/resources.py. Do not edit.\n"


def crd_files() -> dict[str, str]:
    """File name -> YAML text for every CRD (what `kubetune crds --out crds/` writes)."""
    models = set()
    for info in KINDS.values():
        models |= {info.spec_model.__name__, *info.spec_model.model_json_schema(schema_generator=_Generator).get("$defs", {})}
    unused = sorted(set(CEL_RULES) - models)
    if unused:  # a renamed model would silently lose its rules
        raise RuntimeError(f"CEL_RULES for models no CRD uses: {', '.join(unused)}")
    files = {}
    for kind, info in KINDS.items():
        text = yaml.safe_dump(crd(kind), sort_keys=False, width=100, allow_unicode=True)
        files[f"{info.plural}.yaml"] = GENERATED_HEADER + text
    return files
