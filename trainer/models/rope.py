"""RoPE scaling: train and serve at contexts longer than the model was pretrained on.

The scaling goes into the model config before the weights load, so training uses it and
`save_pretrained` writes it: whatever later loads the output (kubetune serve, vLLM) gets it too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from kubetune.trainer.spec import TrainingSpec

log = logging.getLogger(__name__)


def rope_factor(spec: TrainingSpec, context_length: int) -> float | None:
    """The scaling factor: the spec's, else ceil(maxLength / context) when data is longer."""
    scaling = spec.model.ropeScaling
    if scaling is None:
        return None
    if scaling.factor is not None:
        return float(scaling.factor)
    needed = spec.data.maxLength / context_length
    return float(math.ceil(needed)) if needed > 1 else None


def apply_rope_scaling(config: Any, spec: TrainingSpec) -> Any:
    """Set the RoPE scaling on a transformers config in place (returns it)."""
    scaling = spec.model.ropeScaling
    context = getattr(config, "max_position_embeddings", None)
    if scaling is None or context is None:
        return config
    factor = rope_factor(spec, context)
    if factor is None or factor <= 1:
        log.info("rope scaling not needed: data.maxLength %d fits the context %d", spec.data.maxLength, context)
        return config
    params: dict[str, Any] = {"rope_type": scaling.type, "factor": factor}
    if scaling.type in ("yarn", "llama3", "dynamic"):
        params["original_max_position_embeddings"] = context
    if scaling.type == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    current = getattr(config, "rope_parameters", None)
    if isinstance(current, dict):
        config.rope_parameters = {**current, **params}
    else:  # older transformers
        config.rope_scaling = params
    config.max_position_embeddings = int(context * factor)
    log.info("rope scaling: %s x%g (context %d -> %d)", scaling.type, factor, context, config.max_position_embeddings)
    return config
