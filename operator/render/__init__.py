"""Pure rendering: a custom resource (a dict) -> the Kubernetes manifests (dicts) it owns.

No I/O, no kopf, no kubernetes client: every function here takes plain data and returns plain
data, so what the operator creates is tested without a cluster. One module per component
(`training.py` for the training kinds; `inference.py` will follow for InferenceService).
"""

from kubetune.operator.render.common import (
    child_names,
    labels_for,
    owner_reference,
    selector_labels,
)
from kubetune.operator.render.training import (
    RenderOptions,
    render_config_map,
    render_job,
    render_service,
    render_training,
    resolved_manifest,
)

__all__ = [
    "RenderOptions",
    "child_names",
    "labels_for",
    "owner_reference",
    "render_config_map",
    "render_job",
    "render_service",
    "render_training",
    "resolved_manifest",
    "selector_labels",
]
