"""What exists around an InferenceService: its Deployment, Service, HPA and adapters ConfigMap
(an object of the same name that it does not own is reported, never touched), the S3 Secret
and the training jobs it references. The only reads of the serving loop."""

from __future__ import annotations

from typing import Any

from kubetune.operator.common import is_owned_by
from kubetune.operator.kube import KEDA_GROUP_VERSION
from kubetune.operator.references import observe_references, observe_secret, service_references
from kubetune.operator.resources import InferenceServiceSpec
from kubetune.operator.serving.decide import CHILD_KINDS, ServingObserved
from kubetune.operator.serving.render import ServingOptions, adapters_config_name, service_names
from kubetune.operator.validation import validate_resource
from kubetune.trainer.api.errors import SpecErrors


def observe_service(kube: Any, cr: dict[str, Any], options: ServingOptions | None = None) -> ServingObserved:
    meta = cr["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    child, _ = service_names(name)
    observed = ServingObserved()
    for kind, attr in zip(CHILD_KINDS, ("deployment", "service", "hpa", "pdb"), strict=True):
        obj = kube.get(kind, namespace, child)
        if obj is not None and not is_owned_by(obj, cr):
            observed.foreign.append(f"{kind} {child}")
            obj = None
        setattr(observed, attr, obj)
    config = kube.get("ConfigMap", namespace, adapters_config_name(name))
    if config is not None and not is_owned_by(config, cr):
        observed.foreign.append(f"ConfigMap {adapters_config_name(name)}")
        config = None
    observed.adapters_config = config
    try:
        spec: InferenceServiceSpec = validate_resource(cr)  # type: ignore[assignment]
    except SpecErrors:
        return observed
    # The Secret the pods will reference (its own, or the operator's default): metadata only.
    observed.secret_found = observe_secret(kube, namespace, spec, (options or ServingOptions()).storage_defaults)
    observed.references = observe_references(kube, namespace, service_references(spec))
    observe_scaled_object(kube, cr, spec, observed)
    return observed


def observe_scaled_object(kube: Any, cr: dict[str, Any], spec: InferenceServiceSpec, observed: ServingObserved) -> None:
    """Whether KEDA is installed (its ScaledObject CRD served: asked only for minReplicas 0) and
    the service's ScaledObject (a 404 when absent, or when KEDA is not installed)."""
    namespace, (child, _) = cr["metadata"]["namespace"], service_names(cr["metadata"]["name"])
    if spec.scales_to_zero:
        observed.keda = kube.serves(KEDA_GROUP_VERSION, "scaledobjects")
    scaled = kube.get("ScaledObject", namespace, child) if observed.keda is not False else None
    if scaled is not None and not is_owned_by(scaled, cr):
        observed.foreign.append(f"ScaledObject {child}")
        scaled = None
    observed.scaled_object = scaled
