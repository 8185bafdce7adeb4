"""LongLoRA's shifted sparse attention (S²-Attn) for Llama-architecture models, in training only.

S²-Attn (Chen et al. 2023, "LongLoRA", arXiv:2309.12307, section 3.2) splits a sequence into
groups and lets tokens attend only inside their group; half of the heads see the groups shifted
by half a group, so information flows between neighbouring groups. Attention then costs
O(n x group) instead of O(n²), which is what makes fine-tuning at long contexts affordable; the
model is served with ordinary full attention afterwards (the paper's point: the fine-tuned
weights work with full attention).

How it is wired (transformers 5): the attention of a Llama layer calls the function registered
under `config._attn_implementation` in transformers' `AttentionInterface`. `apply_shift_attention`
registers `kubetune_s2_sdpa` / `kubetune_s2_eager`, which wrap the stock SDPA / eager functions
(and reuse their mask builders), and switches the model to it. The wrapper calls the stock
function unchanged when the module is not training, so evaluation, generation and serving use
exactly the attention the model had; in training it regroups queries, keys and values.

The mask each group gets is gathered from the model's own mask (causal, padding, and the
block-diagonal mask of a padding-free batch, whose positions restart per example), indexed by the
tokens' original positions: no token sees a later token or another example, and the group that
wraps around the end of the row (shifted heads) keeps causal order, where LongLoRA's original
code applied a plain causal mask to the rolled tokens. S²-Attn is therefore exactly full
attention under a sparser mask (tests/test_shift_attn.py checks this against full attention with
that mask); grouping only saves the compute.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from kubetune.trainer.api.errors import SpecError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
"""Architectures whose attention goes through transformers' AttentionInterface and which
LongLoRA (and LlamaFactory's `shift_attn`) support."""
GROUP_RATIO = 0.25
"""Group size as a fraction of `data.maxLength`: LongLoRA's `group_size_ratio`."""
BASES = {"sdpa": "kubetune_s2_sdpa", "eager": "kubetune_s2_eager"}


def group_size(max_length: int) -> int:
    """Tokens per group: a quarter of the training context, rounded up to an even number (the
    shifted heads move by half a group)."""
    size = max(2, math.ceil(max_length * GROUP_RATIO))
    return size + size % 2


def group_positions(length: int, group: int, shifted: bool, device: torch.device) -> torch.Tensor:
    """[groups, group] original positions of the tokens in each group, over the row padded to a
    whole number of groups; `shifted` rolls the row back by half a group first (LongLoRA's
    `roll(-group // 2)`), so the last group wraps around to the row's start."""
    total = math.ceil(length / group) * group
    positions = torch.arange(total, device=device)
    if shifted:
        positions = (positions + group // 2) % total
    return positions.view(-1, group)


def allowed_pairs(mask: torch.Tensor | None, positions: torch.Tensor, length: int, batch: int) -> torch.Tensor:
    """[batch, groups, group, group] booleans: may the token at `positions[g, i]` attend to the one
    at `positions[g, j]`? From the model's mask (True/0 = attend; None = plain causal); the padding
    added to fill the last group attends only to itself, so no softmax row is empty."""
    qi, kj = positions[:, :, None], positions[:, None, :]
    inside = (qi < length) & (kj < length)
    if mask is None:
        allowed = (kj <= qi).expand(batch, -1, -1, -1)
    else:
        if mask.dtype != torch.bool:
            mask = mask == 0  # eager's additive mask: 0 where attention is allowed
        if mask.shape[-1] != length or mask.shape[-2] != length:
            raise RuntimeError(f"S²-Attn got a {tuple(mask.shape)} mask for {length} tokens: it trains without a KV cache")
        full = mask[:, 0].expand(batch, -1, -1)
        allowed = full[:, qi.clamp(max=length - 1), kj.clamp(max=length - 1)]
    return (allowed & inside) | (qi == kj)


def _grouped(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[batch, heads, length, dim] -> [batch x groups, heads, group, dim] in `positions`' order."""
    batch, heads, length, dim = states.shape
    total = positions.numel()
    padded = torch.nn.functional.pad(states, (0, 0, 0, total - length))
    picked = padded.index_select(2, positions.reshape(-1))
    groups, group = positions.shape
    return picked.view(batch, heads, groups, group, dim).transpose(1, 2).reshape(batch * groups, heads, group, dim)


def _ungrouped(output: torch.Tensor, positions: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch x groups, group, heads, dim] (an attention function's output) -> [batch, length,
    heads, dim] in the original order."""
    heads, dim = output.shape[2:]
    flat = output.reshape(batch, -1, heads, dim)
    inverse = torch.argsort(positions.reshape(-1))
    return flat.index_select(1, inverse)[:, :length]


def s2_attention(base, module, query, key, value, attention_mask, *, group: int, **kwargs) -> tuple[torch.Tensor, Any]:
    """The stock attention `base` in evaluation; in training, S²-Attn: the first half of the heads
    attend inside groups of `group` tokens, the second half inside groups shifted by half a group.
    Query and key/value head counts are halved alike, so grouped-query attention keeps its pairing."""
    if not module.training:
        return base(module, query, key, value, attention_mask, **kwargs)
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    halves = []
    for index, shifted in enumerate((False, True)):
        positions = group_positions(length, group, shifted, query.device)
        q = _grouped(query[:, index * heads // 2:(index + 1) * heads // 2], positions)
        k = _grouped(key[:, index * kv_heads // 2:(index + 1) * kv_heads // 2], positions)
        v = _grouped(value[:, index * kv_heads // 2:(index + 1) * kv_heads // 2], positions)
        allowed = allowed_pairs(attention_mask, positions, length, batch).reshape(-1, 1, group, group)
        mask = allowed if base.__name__.startswith("sdpa") else _additive(allowed, query.dtype)
        out, _ = base(module, q, k, v, mask, **kwargs)
        halves.append(_ungrouped(out, positions, batch, length))
    return torch.cat(halves, dim=2), None


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive one."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def register(base_name: str) -> str:
    """Register the S²-Attn wrapper of `base_name` (and its mask builder) in transformers'
    interfaces; returns the implementation's name. The group size is an attribute of each
    attention module (`apply_shift_attention` sets it), so nothing of it lands in a saved config."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    base = ALL_ATTENTION_FUNCTIONS["sdpa"] if base_name == "sdpa" else eager_attention_forward
    name = BASES[base_name]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return s2_attention(base, module, query, key, value, attention_mask, group=module.kubetune_s2_group, **kwargs)

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def check_supported(model) -> None:
    """S²-Attn splits the heads in two halves with their key/value heads: refuse a model where
    that is not possible, naming the field, before anything trains."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecError("model.shiftAttention", f"S²-Attn supports Llama-architecture models; this model is {model_type!r}.",
                        "set model.shiftAttention to false for this model.")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    if heads % 2 or kv_heads % 2:
        raise SpecError("model.shiftAttention", f"S²-Attn shifts half of the heads; this model has {heads} attention and "
                        f"{kv_heads} key/value heads (both must be even).", "set model.shiftAttention to false for this model.")


def apply_shift_attention(model, max_length: int) -> str:
    """Switch a loaded Llama model to S²-Attn for training (full attention in eval mode); returns
    the attention implementation's name. A saved config does not record it: the saved model loads
    with the stock attention anywhere."""
    check_supported(model)
    current = model.config._attn_implementation
    if current not in BASES:
        raise SpecError("model.attnImplementation", f"S²-Attn wraps sdpa or eager attention, not {current!r}.",
                        "set model.attnImplementation to sdpa (or auto) with model.shiftAttention.")
    group = group_size(max_length)
    name = register(current)
    attention_modules = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]
    for module in attention_modules:
        module.kubetune_s2_group = group
    model.set_attn_implementation(name)
    log.info("S²-Attn (LongLoRA shift_attn): groups of %d tokens over %s attention in %d layers, in training only",
             group, current, len(attention_modules))
    return name

