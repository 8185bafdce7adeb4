"""Mixture-of-experts models in training: router load-balancing loss, ZeRO-3 leaf modules, and
the router loss in metrics.jsonl.

- **Router aux loss.** Mixtral/Qwen-MoE-style models add a load-balancing loss (Switch
  Transformer, Fedus et al. 2021) to the LM loss, but only when `output_router_logits` is on, which
  their configs leave off: a fine-tune would otherwise let the router collapse onto a few experts.
  `prepare_moe` asks for the router logits in training forwards only (`moe.routerAuxLoss`, with
  the model's own coefficient unless `moe.auxLossCoef` is set), so generation is untouched;
  `RouterAuxLoss` records the loss for each logging window.
- **ZeRO-3 leaf modules.** ZeRO-3 gathers a module's parameters when its forward starts, through
  hooks on every submodule. An MoE block runs only the experts its tokens were routed to, so the
  set of submodules (and the order) differs per rank and per step: ranks wait in different
  all-gathers and the job hangs. Declaring the whole sparse MoE block a leaf
  (`deepspeed.utils.set_z3_leaf_modules`) gathers all its experts at once, the same on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from kubetune.trainer.api.spec import TrainingSpec

log = logging.getLogger(__name__)


def is_moe(config: Any) -> bool:
    """A model with routed experts (Mixtral, Qwen2/3-MoE, OLMoE, ... all name their count so)."""
    config = getattr(config, "text_config", None) or config
    return any((getattr(config, name, None) or 0) > 1 for name in ("num_local_experts", "num_experts", "n_routed_experts"))


def sparse_blocks(model) -> list[type]:
    """The classes of the model's sparse MoE blocks (router + experts): transformers names them
    `<Arch>SparseMoeBlock` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE, ...)."""
    return sorted({type(m) for m in model.modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoeBlock"))},
                  key=lambda cls: cls.__name__)


def prepare_moe(model, spec: TrainingSpec) -> None:
    """Router aux loss on (or off, as `moe` says) and, under ZeRO-3, the MoE blocks as leaves."""
    config = model.config
    if not is_moe(config):
        return
    if hasattr(config, "output_router_logits"):
        # pt/sft compute their loss here (causal_lm); TRL's trainers (dpo, kto, ...) have their own
        # loss, to which the router term is not added: they train as the model's config says.
        if spec.moe.routerAuxLoss and spec.stage in ("pt", "sft"):
            model.register_forward_pre_hook(_router_logits_in_training, with_kwargs=True)
            model.kubetune_router_aux = True
        if spec.moe.auxLossCoef is not None:
            config.router_aux_loss_coef = spec.moe.auxLossCoef
            if hasattr(model, "router_aux_loss_coef"):
                model.router_aux_loss_coef = spec.moe.auxLossCoef
    ds = spec.distributed.deepspeed
    blocks = sparse_blocks(model)
    if ds is not None and ds.stage == 3 and blocks:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, blocks)
    log.info("MoE model: router aux loss %s (coefficient %s)%s", "on" if getattr(model, "kubetune_router_aux", False) else "off",
             getattr(config, "router_aux_loss_coef", None),
             f"; ZeRO-3 leaf modules: {', '.join(c.__name__ for c in blocks)}" if ds is not None and ds.stage == 3 else "")


def _router_logits_in_training(module, args, kwargs):
    """Ask for the router logits (hence the aux loss) in training forwards only: the config's
    `output_router_logits` would also apply to generation, where transformers' loss function
    fails on the decoding steps (one token's router logits against the whole attention mask)."""
    if module.training and kwargs.get("output_router_logits") is None:
        kwargs["output_router_logits"] = True
    return args, kwargs


def router_aux_enabled(model) -> bool:
    """Whether `prepare_moe` turned the router loss on for this (possibly adapter-wrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "kubetune_router_aux", False))


def aux_loss_term(model, outputs) -> Any:
    """`coefficient x aux_loss` of a forward pass, or None (a dense model, or the loss off):
    the term the model adds to its own loss, for a loss computed outside the model."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed's engine
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    coef = getattr(base, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(getattr(base, "config", None), "router_aux_loss_coef", 0.0)
    return coef * aux


class RouterAuxLoss(TrainerCallback):
    """Adds `aux_loss` (the mean router load-balancing loss of the training forward passes since
    the last log record) to each training log record, hence to metrics.jsonl. A forward hook on
    the causal LM reads it from the model's output; evaluation passes are not counted."""

    def __init__(self, model):
        self.total = 0.0
        self.count = 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handle = base.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        aux = getattr(output, "aux_loss", None)
        if aux is not None and module.training:
            self.total += float(aux.detach())
            self.count += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.count:
            logs["aux_loss"] = round(self.total / self.count, 6)
            self.total, self.count = 0.0, 0
