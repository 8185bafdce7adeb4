"""`ppo`: proximal policy optimisation against a reward model or function (the RLHF step of
InstructGPT, LMFlow and LlamaFactory), compact and on top of `transformers.Trainer`.

A rollout batch (the step's prompts x `generation.samplesPerPrompt` answers) is sampled once and
optimised for `ppo.epochs` consecutive optimizer steps (the sampler repeats each batch that often):

- per-token reward: -klCoef x (log pi(a) - log pi_ref(a)), plus the scalar score on the last token;
- advantages by GAE(gamma, lam) over a value head (a linear layer on the policy's last hidden
  state, trained with a clipped value loss weighted by `valueCoef`), whitened per batch;
- the clipped surrogate objective with ratio pi/pi_old clipped to 1 +- `clipRange`.

Model sharing (LlamaFactory's): with LoRA one base serves as policy (adapters on), reference
(adapters off) and the value head's backbone; only `full`/`freeze` keep a frozen reference copy.
The value head is saved beside each checkpoint (`value_head.pt`), so a resumed run keeps its
critic. Logged: reward, KL to the reference, policy/value loss, clip fraction, approx. KL.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.stages.rollout import (
    Rollouts,
    RolloutTrainer,
    answer_logprobs,
    preflight,
    sample_prompts,
)

__all__ = ["build_trainer", "gae", "preflight", "sample_prompts"]

VALUE_HEAD = "kubetune_value_head"
VALUE_HEAD_FILE = "value_head.pt"


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens: (advantages, returns). Positions after
    an answer's end are masked to zero, so they add nothing to the earlier ones."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


class RepeatBatches(Sampler[int]):
    """Yields a seeded permutation in chunks of one global batch, each chunk `repeats` times in a
    row: every process sees the same prompts for `ppo.epochs` consecutive steps."""

    def __init__(self, size: int, global_batch: int, repeats: int, seed: int):
        self.size, self.global_batch, self.repeats, self.seed = size, global_batch, repeats, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size - self.global_batch + 1, self.global_batch):
            chunk = order[start:start + self.global_batch]
            for _ in range(self.repeats):
                yield from chunk

    def __len__(self) -> int:
        return (self.size // self.global_batch) * self.global_batch * self.repeats


@dataclass
class PpoBatch:
    rollouts: Rollouts
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    key: tuple
    uses: int = 0


class PpoTrainer(RolloutTrainer):
    def __init__(self, *args: Any, reference: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reference = reference
        self._batch: PpoBatch | None = None

    def value_head(self, model: Any) -> torch.nn.Module:
        return getattr(self.accelerator.unwrap_model(model), VALUE_HEAD)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        world = self.args.world_size
        return RepeatBatches(len(dataset), self.args.per_device_train_batch_size * world, self.spec.ppo.epochs, self.args.seed)

    # -- experience ---------------------------------------------------------------------------
    @torch.no_grad()
    def experience(self, rows: list[dict[str, Any]]) -> PpoBatch:
        p = self.spec.ppo
        temperature = self.generation.temperature
        rollouts = self.rollout(rows, self.generation.samplesPerPrompt)
        policy = self.policy()
        old_logprobs, out = answer_logprobs(policy, rollouts, temperature, hidden=True)
        old_values = self._values(policy, out, rollouts)
        if self.reference is not None:
            ref_logprobs, _ = answer_logprobs(self.reference, rollouts, temperature)
        else:
            with policy.disable_adapter():
                ref_logprobs, _ = answer_logprobs(policy, rollouts, temperature)
        mask = rollouts.answer_mask.float()
        kl = (old_logprobs - ref_logprobs) * mask
        token_rewards = -p.klCoef * kl
        last = (rollouts.answer_mask.sum(dim=1) - 1).clamp(min=0)
        token_rewards[torch.arange(len(last)), last] += rollouts.rewards
        advantages, returns = gae(token_rewards, old_values, mask, p.gamma, p.lam)
        if p.whitenAdvantages and mask.sum() > 1:
            advantages = whiten(advantages, mask)
        self.record_rollout_metrics(rollouts)
        self._metrics["kl"].append(kl.sum(dim=1).mean().item())
        return PpoBatch(rollouts, old_logprobs, old_values, advantages, returns, key=_rows_key(rows))

    def _values(self, model: Any, out: Any, rollouts: Rollouts) -> torch.Tensor:
        hidden = out.hidden_states[-1][:, rollouts.prompt_len - 1:-1]
        head = self.value_head(model)
        return head(hidden.to(head.weight.dtype)).squeeze(-1)

    # -- the update ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        rows = inputs["rows"]
        key = _rows_key(rows)
        if self._batch is None or self._batch.key != key or self._batch.uses >= self.spec.ppo.epochs:
            self._batch = self.experience(rows)
        batch = self._batch
        batch.uses += 1
        p = self.spec.ppo
        mask = batch.rollouts.answer_mask.float()
        logprobs, out = answer_logprobs(model, batch.rollouts, self.generation.temperature, hidden=True)
        values = self._values(model, out, batch.rollouts)
        ratio = torch.exp(logprobs - batch.old_logprobs)
        surrogate = torch.max(-batch.advantages * ratio, -batch.advantages * ratio.clamp(1 - p.clipRange, 1 + p.clipRange))
        policy_loss = masked_mean(surrogate, mask)
        clipped_values = batch.old_values + (values - batch.old_values).clamp(-p.valueClipRange, p.valueClipRange)
        value_loss = 0.5 * masked_mean(torch.max((values - batch.returns) ** 2, (clipped_values - batch.returns) ** 2), mask)
        loss = policy_loss + p.valueCoef * value_loss
        with torch.no_grad():
            self._metrics["policy_loss"].append(policy_loss.item())
            self._metrics["value_loss"].append(value_loss.item())
            self._metrics["clip_fraction"].append(masked_mean(((ratio - 1).abs() > p.clipRange).float(), mask).item())
            self._metrics["approx_kl"].append(masked_mean(0.5 * (logprobs - batch.old_logprobs) ** 2, mask).item())
        return (loss, out) if return_outputs else loss

    # -- the value head travels with checkpoints ----------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if VALUE_HEAD not in k}
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            target = Path(output_dir or self.args.output_dir)
            torch.save(self.value_head(self.model).state_dict(), target / VALUE_HEAD_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / VALUE_HEAD_FILE
        if saved.is_file():
            self.value_head(model or self.model).load_state_dict(torch.load(saved, map_location="cpu"))


def _rows_key(rows: list[dict[str, Any]]) -> tuple:
    return tuple(tuple(r["prompt_ids"]) for r in rows)


def attach_value_head(model: Any) -> None:
    """A linear value head on the policy's last hidden state, registered as a submodule so every
    wrapper (DDP, DeepSpeed) and the optimizer see it. Starts at zero: no value before training."""
    config = getattr(model, "config", None) or model.get_base_model().config
    head = torch.nn.Linear(config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    device = next(model.parameters()).device
    model.add_module(VALUE_HEAD, head.to(device))


def build_trainer(ctx: RunContext):
    from peft import PeftModel
    from trl.trainer.utils import disable_dropout_in_model

    # Sampling, scoring and the update see one policy; and before the copy, so the reference matches it.
    disable_dropout_in_model(ctx.model)
    reference = None
    if not isinstance(ctx.model, PeftModel):
        reference = copy.deepcopy(ctx.model).eval().requires_grad_(False)
    attach_value_head(ctx.model)
    return PpoTrainer.from_context(ctx, reference=reference)
