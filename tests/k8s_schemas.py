"""Generates operator/core-v1-volume.json: the real core/v1 Volume schema (Kubernetes
1.37, from kubernetes-validate's strict JSON schemas) as a structural OpenAPI schema the CRDs
embed for `spec.podTemplate.spec.volumes` (`crdgen.py` inlines it). Run
`python -m tests.k8s_schemas` to regenerate; tests/test_pod_overrides.py fails when it is stale.

The conversion: references inlined, descriptions and defaults dropped (the API server documents
and defaults the pods), `[T, "null"]` types to T, Quantity/IntOrString (`oneOf` string|number) to
`x-kubernetes-int-or-string`, `additionalProperties: false` dropped (a structural schema prunes
and, with kubectl's strict field validation, refuses unknown fields itself), list-type markers
dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate

ROOT = Path(__file__).resolve().parents[1]
VOLUME_SCHEMA = ROOT / "operator" / "core-v1-volume.json"
VERSION = "1.37.0"
KEEP_FORMATS = {"int32", "int64", "byte"}


def _definitions() -> dict[str, Any]:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{VERSION}-local-strict"
    return json.loads((base / "_definitions.json").read_text())["$defs"]


def structural(node: Any, defs: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, list):
        return [structural(n, defs, seen) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        if name in seen:
            raise ValueError(f"recursive schema at {name}")
        return structural(defs[name], defs, (*seen, name))
    options = node.get("oneOf")
    if options and {json.dumps(o.get("type")) for o in options} <= {'["string", "null"]', '["number", "null"]',
                                                                        '["integer", "null"]'}:
        return {"x-kubernetes-int-or-string": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "default") or key.startswith("x-kubernetes-list") or key == "x-kubernetes-map-type":
            continue
        if key == "type":
            kinds = [t for t in (value if isinstance(value, list) else [value]) if t != "null"]
            out["type"] = kinds[0]
        elif key == "format":
            if value in KEEP_FORMATS:
                out[key] = value
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = structural(value, defs, seen)
        elif key == "properties":
            out[key] = {k: structural(v, defs, seen) for k, v in value.items()}
        elif key == "items":
            out[key] = structural(value, defs, seen)
        else:
            out[key] = value
    return out


def volume_schema() -> dict[str, Any]:
    schema = structural({"$ref": "#/$defs/io.k8s.api.core.v1.Volume"}, _definitions())
    schema["description"] = (f"A core/v1 Volume (Kubernetes {VERSION}'s schema): a name and one volume source "
                             "(persistentVolumeClaim, nfs, csi, configMap, secret, emptyDir, ...).")
    return schema


def text() -> str:
    return json.dumps(volume_schema(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    VOLUME_SCHEMA.parent.mkdir(parents=True, exist_ok=True)
    VOLUME_SCHEMA.write_text(text())
    print(VOLUME_SCHEMA)
