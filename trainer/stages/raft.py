"""`raft`: reward-ranked fine-tuning (Dong et al. 2023, the LMFlow paper's own alignment method).

Each optimizer step is one RAFT iteration:
1. take a batch of prompts (`train.batchSize` per device),
2. sample `generation.samplesPerPrompt` (K) answers to each with the current policy,
3. score every answer with the reward model or function,
4. keep the best answer per prompt (`raft.keep: best`) or the best `raft.topFraction` of the batch,
5. take a supervised step (cross-entropy on the kept answers, prompts masked).

Logged per iteration: mean and max reward of all samples, mean reward of the kept ones, distinct-1/2
of the samples (the paper's diversity measure, Table 5); the kept samples themselves go to
`raft_kept.jsonl`. `evaluate()` reports the greedy answers' mean reward on held-out prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.context import RunContext
from kubetune.trainer.data.processors import IGNORE_INDEX
from kubetune.trainer.rewards import distinct_n
from kubetune.trainer.stages.rollout import Rollouts, RolloutTrainer, preflight, sample_prompts

__all__ = ["build_trainer", "preflight", "sample_prompts", "select_kept"]

KEPT_FILE = "raft_kept.jsonl"


def select_kept(rewards: torch.Tensor, samples: int, keep: str, top_fraction: float) -> list[int]:
    """Indices of the answers RAFT learns from: the argmax within each prompt's K samples, or the
    best `top_fraction` of all of them."""
    if keep == "best":
        per_prompt = rewards.view(-1, samples)
        return [i * samples + int(j) for i, j in enumerate(per_prompt.argmax(dim=1).tolist())]
    count = max(1, math.ceil(top_fraction * rewards.numel()))
    return sorted(torch.topk(rewards, count).indices.tolist())


class RaftTrainer(RolloutTrainer):
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        rows = inputs["rows"]
        k = self.generation.samplesPerPrompt
        rollouts = self.rollout(rows, k)
        kept = select_kept(rollouts.rewards, k, self.spec.raft.keep, self.spec.raft.topFraction)
        self.record_rollout_metrics(rollouts)
        self._metrics["kept_reward"].append(rollouts.rewards[kept].mean().item())
        self._metrics["distinct_1"].append(distinct_n(rollouts.completions, 1))
        self._metrics["distinct_2"].append(distinct_n(rollouts.completions, 2))
        self._write_kept(rollouts, kept)
        batch = self._supervised_batch(rows, rollouts, kept, k)
        outputs = model(**batch, use_cache=False)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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
