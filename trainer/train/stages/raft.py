"""`raft`: reward-ranked fine-tuning (Dong et al. 2023, the LMFlow paper's own alignment method).

Each optimizer step is one RAFT iteration:
1. take a batch of prompts (`train.batchSize` per device),
2. sample `generation.samplesPerPrompt` (K) answers to each with the current policy,
3. score every answer with the reward model or function,
4. keep the best answer per prompt (`raft.keep: best`) or the best `raft.topFraction` of the batch,
   of those only the answers that reach the minimum reward (`raft.minReward`; by default above the
   mean reward of the iteration's samples, as the paper's reward-ranked selection: a prompt whose
   answers all failed contributes nothing, rather than its least-bad failure),
5. take a supervised step (cross-entropy on the kept answers, prompts masked); an iteration that
   keeps nothing changes nothing.

Logged per iteration: mean and max reward of all samples, mean reward of the kept ones and the
share of prompts kept, distinct-1/2 of the samples (the paper's diversity measure, Table 5); the
kept samples themselves go to `raft_kept.jsonl`, and `loss.png` plots the sample, kept and
held-out rewards. `evaluate()` reports the greedy answers' mean reward on held-out prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.data.processors import IGNORE_INDEX
from kubetune.trainer.train.rewards import distinct_n
from kubetune.trainer.train.stages.rollout import Rollouts, RolloutTrainer, preflight, sample_prompts

__all__ = ["build_trainer", "preflight", "sample_prompts", "select_kept"]

KEPT_FILE = "raft_kept.jsonl"


def select_kept(rewards: torch.Tensor, samples: int, keep: str, top_fraction: float, min_reward: float | None = None) -> list[int]:
    """Indices of the answers RAFT learns from: the argmax within each prompt's K samples, or the
    best `top_fraction` of all of them; of those, the ones at or above `min_reward` (unset:
    strictly above the mean of all samples, so a batch where every answer scores alike keeps none)."""
    if keep == "best":
        per_prompt = rewards.view(-1, samples)
        ranked = [i * samples + int(j) for i, j in enumerate(per_prompt.argmax(dim=1).tolist())]
    else:
        count = max(1, math.ceil(top_fraction * rewards.numel()))
        ranked = sorted(torch.topk(rewards, count).indices.tolist())
    if min_reward is None:
        mean = rewards.mean().item()
        return [i for i in ranked if rewards[i].item() > mean]
    return [i for i in ranked if rewards[i].item() >= min_reward]


class RaftTrainer(RolloutTrainer):
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        rows = inputs["rows"]
        k = self.generation.samplesPerPrompt
        rollouts = self.rollout(rows, k)
        raft = self.spec.raft
        kept = select_kept(rollouts.rewards, k, raft.keep, raft.topFraction, raft.minReward)
        self.record_rollout_metrics(rollouts)
        self._metrics["kept_fraction"].append(len(kept) / len(rows))
        if kept:
            self._metrics["kept_reward"].append(rollouts.rewards[kept].mean().item())
        self._metrics["distinct_1"].append(distinct_n(rollouts.completions, 1))
        self._metrics["distinct_2"].append(distinct_n(rollouts.completions, 2))
        self._write_kept(rollouts, kept)
        if not kept and self.args.world_size == 1:
            # No gradient at all (not a zero one): the optimizer skips every parameter, so neither
            # momentum nor weight decay moves the model on an iteration with nothing to learn.
            nothing = torch.zeros((), device=self.args.device, requires_grad=True)
            return (nothing, None) if return_outputs else nothing
        # Other ranks may have kept answers: every rank runs the forward for the gradient sync,
        # a rank with nothing kept at weight zero.
        batch = self._supervised_batch(rows, rollouts, kept or [0], k)
        outputs = model(**batch, use_cache=False)
        loss = outputs.loss if kept else outputs.loss * 0.0
        return (loss, outputs) if return_outputs else loss

    def _supervised_batch(self, rows: list[dict[str, Any]], rollouts: Rollouts, kept: list[int], k: int) -> dict[str, torch.Tensor]:
        pad = self.processing_class.pad_token_id
        pad = pad if pad is not None else self.processing_class.eos_token_id
        sequences, labels = [], []
        for index in kept:
            prompt = list(rows[index // k]["prompt_ids"])
            answer = rollouts.answer_ids[index][rollouts.answer_mask[index].bool()].tolist()
            sequences.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        width = max(len(s) for s in sequences)
        device = self.args.device
        return {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels], device=device),
        }

    def _write_kept(self, rollouts: Rollouts, kept: list[int]) -> None:
        if not self.is_world_process_zero():
            return
        with (Path(self.args.output_dir) / KEPT_FILE).open("a") as f:
            for index in kept:
                f.write(json.dumps({"step": self.state.global_step, "prompt": rollouts.prompts[index],
                                    "completion": rollouts.completions[index], "reward": rollouts.rewards[index].item()}) + "\n")


def build_trainer(ctx: RunContext):
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(ctx.model)  # sampling and scoring must see the policy the update sees
    return RaftTrainer.from_context(ctx)
