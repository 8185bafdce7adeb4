"""Glue between the runner's `TrainingArguments` and TRL's trainers (shared by rm and dpo)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from kubetune.trainer.train.context import RunContext


def trl_config(config_cls: type, args: Any, **extra: Any) -> Any:
    """A TRL config (`RewardConfig`, `DPOConfig`, ...) carrying every TrainingArguments value the
    runner decided, so TRL's own defaults (bf16, gradient checkpointing, lr) never leak in."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
    # __post_init__ turns these into richer objects; hand back what the user-facing field takes.
    values["lr_scheduler_type"] = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    values["optim"] = getattr(args.optim, "value", args.optim)
    for name in ("eval_strategy", "save_strategy", "logging_strategy"):
        values[name] = getattr(values[name], "value", values[name])
    values.pop("hub_strategy", None)
    values.update(extra)
    return config_cls(**values)


def count_tokens_with(ctx: RunContext, collator: Any) -> Any:
    """Route the stage's own collator through the runner's token counter (tokens/s in metrics)."""
    counter = ctx.data_collator
    if hasattr(counter, "collate"):
        counter.collate = collator
        return counter
    return collator



COMPACT_HEAD_DEVICES = ("cpu", "cuda", "mps", "xpu")
"""Devices whose kernels take any number of positions (no compiler recompiling per shape)."""
PLAIN_HEAD_MAX_BYTES = 512 * 2**20
"""Largest (labelled positions x vocabulary) fp32 logits the plain head materialises (it keeps
about twice that for the backward); above it, TRL's tiled kernel, which never holds them."""


class LabelledLogProbs:
    """Stands in for TRL's `ChunkedLogProbFunction` (same `apply` arguments and outputs) on devices
    without Triton, when the logits of the labelled positions are small (`PLAIN_HEAD_MAX_BYTES`):
    one matmul and `log_softmax`, 2-3x less CPU time than TRL's torch fallback of its Triton
    kernel (an online log-sum-exp in Python over each tile, and the projection again in the
    backward). The logged extras (entropy, mean logit, top-1) carry no gradient here: DPO logs
    them detached. Triton devices and large logits keep TRL's kernel."""

    tiled: Any = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        import torch
        import trl.kernels.chunked_logprob as kernels

        if kernels._use_triton(hidden.device) or hidden.shape[0] * weight.shape[0] * 4 > PLAIN_HEAD_MAX_BYTES:
            return cls.tiled.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        log_p = logits.log_softmax(-1)
        log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            extras = {"entropy": lambda: -(log_p.exp() * log_p).sum(-1), "log_sum_sq_probs": lambda: (2 * log_p).logsumexp(-1),
                      "mean_logits": lambda: logits.mean(-1), "is_top1": lambda: logits.argmax(-1) == targets}
            return (log_probs, *(extras[name]() if name in outputs else None for name in extras))


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Inside: TRL's fused LM head (`add_fused_lm_head`, `fused_lm_head=True`) scores only the
    positions that carry a label on every eager device, as it already does where Triton runs.

    Without Triton (CPU, MPS) TRL scores every position, prompt and padding included, and zeroes
    the unlabelled ones afterwards, to keep tile shapes fixed for compiling backends (XLA/Neuron).
    On a DPO step that is 3-4x the output-layer work for the same log-probs; the profile of the
    benchmark's DPO run spent 47% of its training time in that head. The per-token outputs are the
    same either way (unlabelled positions are zero); TRL keeps its choice on other devices. Small
    heads without Triton run plain (`LabelledLogProbs`)."""
    import trl.trainer.utils as trl_utils

    original, tiled = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    trl_utils._use_triton = lambda device: original(device) or device.type in COMPACT_HEAD_DEVICES
    LabelledLogProbs.tiled, trl_utils._ChunkedLogProbFunction = tiled, LabelledLogProbs
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = original, tiled
