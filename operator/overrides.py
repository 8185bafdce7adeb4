"""Pod template overrides (`spec.podTemplate`) and the platform's defaults under them (pure).

A platform adds to kubetune's pods what its cluster needs (Kubeflow Trainer's
`podTemplateOverrides` for the one pod shape kubetune renders): labels and annotations
(`sidecar.istio.io/inject`), imagePullSecrets, schedulerName, runtimeClassName, hostNetwork,
volumes mounted into the main container, extra env/envFrom, capabilities, init containers and
sidecars. Two layers, merged in this order:

1. the platform's defaults (`--platform-defaults FILE`, Helm `platformDefaults`), written once by
   the platform team: the operator's `PlatformDefaults`;
2. the resource's own `spec.podTemplate`, which wins over the defaults (same label, same volume
   name, same variable: the resource's).

The result is laid over the pod kubetune rendered, and there kubetune's own fields win: a label,
volume, mount path, variable or container name kubetune uses is never replaced. Admission
(`validation.validate_resource`, hence the webhook and `kubetune validate`) refuses a resource
whose podTemplate collides with one, naming the field, so nothing is silently dropped; the
renderer skips what collides (a platform default never breaks a resource's pods).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from kubetune.operator.resources import (
    CrModel,
    ExtraContainer,
    PodTemplate,
    Toleration,
)

RESERVED_KEY_PREFIXES = ("kubetune.io/", "app.kubernetes.io/", "kubectl.kubernetes.io/")
"""Label/annotation keys that are kubetune's (or kubectl's) whatever the rendered pod carries."""
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
"""The securityContext an extra container starts from (restricted Pod Security Standard)."""
BASELINE_REFUSES = "hostNetwork and added capabilities other than NET_BIND_SERVICE"


class PlatformDefaults(CrModel):
    """What the platform team fixes once for every kubetune pod (Kubeflow's
    ClusterTrainingRuntime idea): a pod template, plus placement. Each resource's own fields win
    (its podTemplate over `podTemplate`, its nodeSelector keys over `nodeSelector`; tolerations
    add up). Images are the operator's `--trainer-image`/`--vllm-image` (Helm `jobs.trainerImage`,
    `serving.vllmImage`)."""

    podTemplate: PodTemplate = Field(default_factory=PodTemplate)
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


@dataclass(frozen=True)
class Conflict:
    """An override kubetune does not apply because one of its own fields is there."""

    field: str
    """Path inside `spec.podTemplate` (e.g. `container.volumeMounts[0].mountPath`)."""
    problem: str
    fix: str


def _by_key(defaults: list[Any], own: list[Any], key: str) -> list[Any]:
    """Defaults then own items; an own item replaces the default with the same `key`."""
    names = {getattr(item, key) if not isinstance(item, dict) else item.get(key) for item in own}
    kept = [d for d in defaults if (getattr(d, key) if not isinstance(d, dict) else d.get(key)) not in names]
    return [*kept, *own]


def merge_templates(defaults: PodTemplate | None, own: PodTemplate) -> PodTemplate:
    """The platform's pod template under the resource's (the resource wins, item by item)."""
    if defaults is None:
        return own
    d, o = defaults, own
    caps = [c for c in d.container.securityContext.capabilities.add if c not in o.container.securityContext.capabilities.add]
    security = o.container.securityContext.model_dump(exclude_unset=True)
    base_security = d.container.securityContext.model_dump(exclude_unset=True)
    merged_security = {**base_security, **security,
                       "capabilities": {"add": [*caps, *o.container.securityContext.capabilities.add]}}
    return PodTemplate.model_validate({
        "metadata": {"labels": {**d.metadata.labels, **o.metadata.labels},
                     "annotations": {**d.metadata.annotations, **o.metadata.annotations}},
        "spec": {
            "imagePullSecrets": [r.model_dump() for r in _by_key(d.spec.imagePullSecrets, o.spec.imagePullSecrets, "name")],
            "schedulerName": o.spec.schedulerName or d.spec.schedulerName,
            "runtimeClassName": o.spec.runtimeClassName or d.spec.runtimeClassName,
            "hostNetwork": o.spec.hostNetwork if o.spec.hostNetwork is not None else d.spec.hostNetwork,
            "volumes": _by_key(d.spec.volumes, o.spec.volumes, "name"),
            "initContainers": [c.model_dump() for c in _by_key(d.spec.initContainers, o.spec.initContainers, "name")],
            "containers": [c.model_dump() for c in _by_key(d.spec.containers, o.spec.containers, "name")],
        },
        "container": {
            "env": [e.model_dump() for e in _by_key(d.container.env, o.container.env, "name")],
            "envFrom": [e.model_dump() for e in [*d.container.envFrom, *o.container.envFrom]],
            "volumeMounts": [m.model_dump() for m in _by_key(d.container.volumeMounts, o.container.volumeMounts, "mountPath")],
            "securityContext": merged_security,
        },
    })


def effective_template(spec: Any, defaults: PlatformDefaults | None) -> PodTemplate:
    """The pod template a resource's pods get: the platform's defaults under its own."""
    return merge_templates(defaults.podTemplate if defaults else None, spec.podTemplate)


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


def extra_container(container: ExtraContainer) -> dict[str, Any]:
    """An init container or sidecar as a core/v1 Container: kubetune's restricted
    securityContext with the override's additions (capabilities added, never a drop removed)."""
    body = {k: v for k, v in _dump(container).items() if v not in ([], {})}
    security = copy.deepcopy(RESTRICTED_CONTAINER)
    own = _dump(container.securityContext)
    added = own.pop("capabilities", {}).get("add") or []
    security.update(own)
    if added:
        security["capabilities"]["add"] = list(added)
    body["securityContext"] = security
    resources = body.get("resources")
    if resources is not None:
        body["resources"] = {k: v for k, v in resources.items() if v}
        if not body["resources"]:
            body.pop("resources")
    return body


def _reserved(key: str, ours: dict[str, Any]) -> bool:
    return key in ours or key.startswith(RESERVED_KEY_PREFIXES)


def _apply_metadata(meta: dict[str, Any], override: PodTemplate, conflicts: list[Conflict]) -> None:
    for block in ("labels", "annotations"):
        ours = meta.get(block) or {}
        added = {}
        for key, value in getattr(override.metadata, block).items():
            if _reserved(key, ours):
                conflicts.append(Conflict(f"metadata.{block}[{key}]", f"{key} is set by kubetune on its pods.",
                                          "remove it from the podTemplate (a kubetune.io/, app.kubernetes.io/ or "
                                          "kubectl.kubernetes.io/ key, or one the pod already carries)."))
            else:
                added[key] = value
        if added:
            meta[block] = {**added, **ours}


def _apply_pod_fields(pod: dict[str, Any], override: PodTemplate, conflicts: list[Conflict]) -> None:
    spec = override.spec
    secrets = {s.get("name") for s in pod.get("imagePullSecrets") or []}
    extra = [{"name": s.name} for s in spec.imagePullSecrets if s.name not in secrets]
    if extra:
        pod["imagePullSecrets"] = [*(pod.get("imagePullSecrets") or []), *extra]
    for name in ("schedulerName", "runtimeClassName"):
        value = getattr(spec, name)
        if value is None:
            continue
        if pod.get(name) not in (None, value):
            conflicts.append(Conflict(f"spec.{name}", f"kubetune already sets {name} {pod[name]!r} for this resource "
                                      "(its gang scheduling).", f"remove spec.{name} from the podTemplate."))
        else:
            pod[name] = value
    if spec.hostNetwork is not None:
        pod["hostNetwork"] = spec.hostNetwork
        if spec.hostNetwork:
            pod.setdefault("dnsPolicy", "ClusterFirstWithHostNet")  # the gang still resolves its Service
    names = {v["name"] for v in pod.get("volumes") or []}
    ours = ", ".join(sorted(names))
    for i, volume in enumerate(spec.volumes):
        if volume["name"] in names:
            conflicts.append(Conflict(f"spec.volumes[{i}].name", f"volume {volume['name']!r} is one of kubetune's "
                                      f"({ours}) or named twice.", "give the volume another name."))
        else:
            pod.setdefault("volumes", []).append(copy.deepcopy(volume))
            names.add(volume["name"])


def _apply_containers(pod: dict[str, Any], override: PodTemplate, conflicts: list[Conflict]) -> None:
    taken = {c["name"] for c in [*(pod.get("initContainers") or []), *pod["containers"]]}
    ours = ", ".join(sorted(taken))
    for block in ("initContainers", "containers"):
        added = []
        for i, container in enumerate(getattr(override.spec, block)):
            if container.name in taken:
                conflicts.append(Conflict(f"spec.{block}[{i}].name", f"{container.name!r} is the name of one of "
                                          f"kubetune's containers ({ours}) or named twice.",
                                          "give the container another name."))
                continue
            taken.add(container.name)
            added.append(extra_container(container))
        if added:  # platform init containers first (e.g. a native sidecar the fetch step needs)
            pod[block] = [*added, *(pod.get(block) or [])] if block == "initContainers" else [*pod[block], *added]


def _apply_main(container: dict[str, Any], override: PodTemplate, spec_env: set[str],
                conflicts: list[Conflict]) -> None:
    main = override.container
    set_names = {e["name"] for e in container.get("env") or []}
    for i, var in enumerate(main.env):
        if var.name in spec_env:
            conflicts.append(Conflict(f"container.env[{i}].name", f"{var.name} is also in spec.env.",
                                      "set it in one place (spec.env)."))
        elif var.name in set_names:
            conflicts.append(Conflict(f"container.env[{i}].name", f"{var.name} is set by kubetune in the "
                                      f"{container['name']} container.",
                                      "remove it from the podTemplate (spec.env may override kubetune's defaults)."))
        else:
            container.setdefault("env", []).append(_dump(var))
            set_names.add(var.name)
    if main.envFrom:
        container["envFrom"] = [*(container.get("envFrom") or []), *(_dump(e) for e in main.envFrom)]
    paths = {m["mountPath"] for m in container.get("volumeMounts") or []}
    for i, mount in enumerate(main.volumeMounts):
        if mount.mountPath.rstrip("/") in paths:
            conflicts.append(Conflict(f"container.volumeMounts[{i}].mountPath", f"kubetune mounts its own volume at "
                                      f"{mount.mountPath} in the {container['name']} container.",
                                      f"mount it elsewhere (kubetune uses {', '.join(sorted(paths))}), e.g. below "
                                      "/workspace or at /mnt/NAME."))
        else:
            container.setdefault("volumeMounts", []).append(_dump(mount))
            paths.add(mount.mountPath.rstrip("/"))
    security = _dump(main.securityContext)
    added = security.pop("capabilities", {}).get("add") or []
    context = container.setdefault("securityContext", copy.deepcopy(RESTRICTED_CONTAINER))
    context.update(security)
    if added:
        context.setdefault("capabilities", {"drop": ["ALL"]})["add"] = list(added)


def apply_pod_template(template: dict[str, Any], override: PodTemplate, main: str,
                       spec_env: set[str] | None = None) -> tuple[dict[str, Any], list[Conflict]]:
    """`template` (a pod template: metadata + spec) with `override` laid over it, and what was
    not applied because kubetune uses it (its labels, volumes, mount paths, variables and
    container names win). `main`: the container that gets `override.container`; `spec_env`: the
    names the resource's spec.env sets (an override repeating one is a conflict, not a silent
    second value)."""
    out = copy.deepcopy(template)
    conflicts: list[Conflict] = []
    out.setdefault("metadata", {})
    _apply_metadata(out["metadata"], override, conflicts)
    pod = out["spec"]
    _apply_pod_fields(pod, override, conflicts)
    _apply_containers(pod, override, conflicts)
    for container in pod["containers"]:
        if container["name"] == main:
            _apply_main(container, override, spec_env or set(), conflicts)
    volumes = {v["name"] for v in pod.get("volumes") or []}
    for i, mount in enumerate(override.container.volumeMounts):
        if mount.name not in volumes:
            conflicts.append(Conflict(f"container.volumeMounts[{i}].name", f"names no volume of the pod: {mount.name!r}.",
                                      "add it to podTemplate.spec.volumes (or fix the name)."))
    return out, conflicts


def privileged_warnings(template: PodTemplate) -> list[str]:
    """What needs a namespace whose Pod Security level is privileged (a warning, not a refusal:
    the platform decides where that is allowed)."""
    needs = []
    if template.spec.hostNetwork:
        needs.append("hostNetwork")
    added = [c for c in template.container.securityContext.capabilities.add if c != "NET_BIND_SERVICE"]
    for container in [*template.spec.initContainers, *template.spec.containers]:
        added += [c for c in container.securityContext.capabilities.add if c != "NET_BIND_SERVICE" and c not in added]
    if added:
        needs.append("capabilities " + ", ".join(added))
    if not needs:
        return []
    return [f"spec.podTemplate asks for {' and '.join(needs)}: the restricted and baseline Pod Security Standards "
            f"refuse {BASELINE_REFUSES}, so the namespace must be labelled "
            "pod-security.kubernetes.io/enforce=privileged (a platform decision). The pods still run as non-root."]


def _with_default_placement(pod: dict[str, Any], defaults: PlatformDefaults | None) -> None:
    """The platform's nodeSelector under the pod's own keys; its tolerations added."""
    if defaults is None:
        return
    if defaults.nodeSelector:
        pod["nodeSelector"] = {**defaults.nodeSelector, **(pod.get("nodeSelector") or {})}
    own = pod.get("tolerations") or []
    extra = [t for t in (_dump(t) for t in defaults.tolerations) if t not in own]
    if extra:
        pod["tolerations"] = [*own, *extra]


def customized(template: dict[str, Any], spec: Any, defaults: PlatformDefaults | None, main: str) -> dict[str, Any]:
    """The renderers' hook: a rendered pod template with the platform's defaults and the
    resource's podTemplate applied. What collides with kubetune's own fields is left out here
    (admission has refused it for the resource; a platform default never breaks a pod)."""
    out, _ = apply_pod_template(template, effective_template(spec, defaults), main, {e.name for e in spec.env})
    _with_default_placement(out["spec"], defaults)
    return out
