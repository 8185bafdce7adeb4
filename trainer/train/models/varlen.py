"""Variable-length SDPA: padding-free batches without the quadratic mask.

A padding-free batch is one row of several examples whose positions restart at 0 for each. With
flash-attn, transformers runs the varlen kernel on it: each example attends within itself, and the
cost is the sum of the examples' squared lengths. With plain SDPA (every CPU, and GPUs without
flash-attn), transformers builds a block-diagonal mask over the whole row and SDPA computes the full
row x row score matrix, most of it masked: for four examples of equal length, four times the
attention work of the examples alone, and a mask and scores of the row's length squared in memory.

`kubetune_varlen_sdpa` is SDPA that takes the batch's example boundaries (`cu_seq_lens_q`, the
cumulative lengths the collator adds, as transformers' flattening collator does for flash-attn)
and runs causal SDPA per example: the same result (tested to 1e-5 against the block-diagonal mask),
the varlen cost. Anything else (a padded batch with its mask, generation with a KV cache, sliding
windows, soft-capped scores) goes to transformers' own SDPA with the mask transformers built, so a
model switched to it behaves as an `sdpa` model everywhere but in padding-free training.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

log = logging.getLogger(__name__)

VARLEN_SDPA = "kubetune_varlen_sdpa"
_registered = False


def varlen_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Causal SDPA per example of a padding-free row; transformers' SDPA for any other call."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (bounds is None or query.shape[0] != 1 or key.shape[2] != query.shape[2] or kwargs.get("sliding_window")
            or kwargs.get("softcap") or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    edges = bounds.tolist()
    grouped = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    parts = [scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                          is_causal=True, scale=scaling, enable_gqa=grouped)
             for s, e in itertools.pairwise(edges)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `kubetune_varlen_sdpa` an attention implementation transformers knows (once), with
    SDPA's mask builder for the calls it hands on."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
        _registered = True
    return VARLEN_SDPA


def use_varlen_sdpa(model: Any) -> bool:
    """Switch a model loaded with `sdpa` to the variable-length SDPA (for padding-free training);
    False, and the model unchanged, for any other attention implementation."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    log.info("attention: SDPA per example of each padding-free batch (%s)", VARLEN_SDPA)
    return True

