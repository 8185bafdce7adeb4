"""RoPE scaling: train and serve at contexts longer than the model was pretrained on.

The scaling goes into the model config before the weights load, so training uses it and
`save_pretrained` writes it: whatever later loads the output (kubetune serve, vLLM) gets it too.

`dynamic` (NTK-aware) differs from the others in how transformers reads the config: the
`max_position_embeddings` it sees IS the original window (it rescales the frequencies once a
sequence grows past it, and has no `original_max_position_embeddings` key), so it must stay
unchanged; raising it would leave every position inside the extended window unscaled.
`context_length` gives the window a scaled config serves (vLLM derives the same: the original
length times the factor).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from kubetune.trainer.api.spec import TrainingSpec

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


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE scaling dict, in either transformers spelling ({} when unscaled)."""
    current = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return current if isinstance(current, dict) else {}


def context_length(config: Any) -> int | None:
    """The longest sequence a config's model is meant to run: `max_position_embeddings`, times the
    factor for dynamic scaling (whose config keeps the original window, see the module doc)."""
    context = getattr(config, "max_position_embeddings", None)
    params = rope_parameters(config)
    if context and params.get("rope_type") == "dynamic" and params.get("factor"):
        return int(context * float(params["factor"]))
    return context


def warn_beyond_context(config: Any, spec: TrainingSpec) -> None:
    """Positions past the model's window (scaled or not) are ones it never saw: RoPE extrapolates
    poorly, a learned position table has no row for them. Said before anything trains."""
    context = context_length(config)
    if context and spec.data.maxLength > context:
        log.warning("data.maxLength %d is beyond the model's context of %d tokens: examples longer than %d tokens "
                    "train at positions the model never saw. Lower data.maxLength to %d, or set model.ropeScaling "
                    "(e.g. {type: linear}) to extend the context.", spec.data.maxLength, context, context, context)


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
    if scaling.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = context
    if scaling.type == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    current = getattr(config, "rope_parameters", None)
    if isinstance(current, dict):
        config.rope_parameters = {**current, **params}
    else:  # older transformers
        config.rope_scaling = params
    if scaling.type != "dynamic":
        config.max_position_embeddings = int(context * factor)
    log.info("rope scaling: %s x%g (context %d -> %d)", scaling.type, factor, context, int(context * factor))
    return config
