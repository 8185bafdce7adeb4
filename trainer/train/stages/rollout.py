"""What `ppo` and `raft` share: a `transformers.Trainer` whose every step starts by sampling
answers from the policy being trained and scoring them with the reward source.

Building on `Trainer` (rather than a loop of our own) keeps everything the runner provides for
the other stages: checkpoints and resume, SIGTERM handling, metrics JSONL, status.json, DDP and
DeepSpeed ZeRO-1/2, LoRA+, 8-bit optimizers. A step's "batch" is a list of prompt rows (the
`PromptProcessor` columns: `prompt`, `prompt_ids`, `prompt_messages`, `reference`); the subclass
turns the scored rollouts into a loss.

Evaluation is generation too: `evaluate()` answers every held-out prompt greedily and reports the
mean reward (`eval_reward`), its maximum and the answers' diversity (distinct-1/2), so a run's
metrics show the reward rising on prompts it never trained on.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from kubetune.trainer.api.spec import GenerationSpec, TrainingSpec
from kubetune.trainer.train.rewards import distinct_n, load_scorer, preflight_reward
from kubetune.trainer.train.samples import prompt_column_prompts

sample_prompts = prompt_column_prompts
"""The runner's hook: prompts for the before/after samples come from the rows' `prompt_ids`."""

log = logging.getLogger(__name__)

EVAL_SAMPLES_FILE = "rollout_eval.jsonl"
"""Per evaluation: each held-out prompt's greedy answer and its reward (rank 0)."""


def preflight(spec: TrainingSpec) -> TrainingSpec:
    preflight_reward(spec)
    return spec


def keep_rows(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The collator: prompt rows go to the step as they are (generation pads them itself)."""
    return {"rows": rows}


@dataclass
class Rollouts:
    """Sampled answers, `samples` per prompt, in prompt order (prompt i -> rows i*k .. i*k+k-1)."""

    sequences: torch.Tensor
    """[n, prompt_len + answer_len]: left-padded prompts followed by the answers (pad after eos)."""
    attention_mask: torch.Tensor
    prompt_len: int
    answer_mask: torch.Tensor
    """[n, answer_len]: 1 for answer tokens up to and including the first eos."""
    prompts: list[str]
    completions: list[str]
    columns: dict[str, list[Any]]
    """Per-sequence dataset columns for the reward (`reference`, `prompt_messages` as JSON)."""
    rewards: torch.Tensor
    """[n] reward of each answer."""

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them, so training-time log-probs of a
    sampled answer equal the sampling-time ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_logprobs(model: Any, rollouts: Rollouts, temperature: float, *, hidden: bool = False) -> tuple[torch.Tensor, Any]:
    """Log-probabilities of the answer tokens under `model` (at the sampling temperature), and the
    model output (hidden states included when asked, for a value head)."""
    out = model(input_ids=rollouts.sequences, attention_mask=rollouts.attention_mask,
                position_ids=position_ids(rollouts.attention_mask), output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, rollouts.prompt_len - 1:-1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, rollouts.answer_ids.unsqueeze(-1)).squeeze(-1)
    return logprobs, out


class RolloutTrainer(Trainer):
    """A Trainer whose steps sample from the policy and score the samples (see module doc)."""

    def __init__(self, *args: Any, spec: TrainingSpec, token_counter: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.generation: GenerationSpec = spec.generation
        self.scorer = load_scorer(spec, device=self.args.device, policy=self.model)
        self.token_counter = token_counter
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # -- rollouts -----------------------------------------------------------------------------
    def policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def rollout(self, rows: list[dict[str, Any]], samples: int, *, greedy: bool = False) -> Rollouts:
        tokenizer = self.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r["prompt_ids"])) + list(r["prompt_ids"]) for r in rows], device=self.args.device)
        mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows], device=self.args.device)
        policy = self.policy()
        was_training = policy.training
        policy.eval()
        g = self.generation
        try:
            sequences = policy.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=g.maxNewTokens, do_sample=not greedy,
                temperature=g.temperature if not greedy else None, top_p=g.topP if not greedy else None,
                top_k=(g.topK or None) if not greedy else None, num_return_sequences=samples,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            )
        finally:
            policy.train(was_training)
        answers = sequences[:, width:]
        answer_mask = self._until_eos(answers, tokenizer.eos_token_id)
        prompt_mask = mask.repeat_interleave(samples, dim=0)
        completions = [tokenizer.decode(a[m.bool()], skip_special_tokens=True) for a, m in zip(answers, answer_mask, strict=True)]
        prompts = [r["prompt"] for r in rows for _ in range(samples)]
        columns = {
            "reference": [r.get("reference") for r in rows for _ in range(samples)],
            "prompt_messages": [r.get("prompt_messages") for r in rows for _ in range(samples)],
        }
        rewards = torch.tensor(self.scorer(prompts, completions, **columns), dtype=torch.float32, device=self.args.device)
        if self.token_counter is not None:
            self.token_counter.tokens += int(prompt_mask.sum() + answer_mask.sum())
        return Rollouts(sequences=sequences, attention_mask=torch.cat([prompt_mask, answer_mask], dim=1), prompt_len=width,
                        answer_mask=answer_mask, prompts=prompts, completions=completions, columns=columns, rewards=rewards)

    @staticmethod
    def _until_eos(answers: torch.Tensor, eos_id: int | None) -> torch.Tensor:
        if eos_id is None:
            return torch.ones_like(answers)
        is_eos = answers == eos_id
        seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        return (seen_before == 0).long()  # everything up to and including the first eos

    def record_rollout_metrics(self, rollouts: Rollouts) -> None:
        self._metrics["reward"].append(rollouts.rewards.mean().item())
        self._metrics["reward_max"].append(rollouts.rewards.max().item())
        self._metrics["answer_tokens"].append(rollouts.answer_mask.sum(1).float().mean().item())

    # -- Trainer hooks ------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Step metrics are averaged since the last log record (like TRL's trainers)."""
        if self._metrics and not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        rows = [dataset[i] for i in range(len(dataset))]
        batch = max(1, self.args.per_device_eval_batch_size)
        rewards: list[float] = []
        completions: list[str] = []
        records = []
        for start in range(0, len(rows), batch):
            rollouts = self.rollout(rows[start:start + batch], 1, greedy=True)
            rewards.extend(rollouts.rewards.tolist())
            completions.extend(rollouts.completions)
            records.extend({"prompt": p, "completion": c, "reward": r}
                           for p, c, r in zip(rollouts.prompts, rollouts.completions, rollouts.rewards.tolist(), strict=True))
        metrics = {
            f"{metric_key_prefix}_reward": sum(rewards) / len(rewards),
            f"{metric_key_prefix}_reward_max": max(rewards),
            f"{metric_key_prefix}_distinct_1": distinct_n(completions, 1),
            f"{metric_key_prefix}_distinct_2": distinct_n(completions, 2),
        }
        if self.is_world_process_zero():
            with (Path(self.args.output_dir) / EVAL_SAMPLES_FILE).open("a") as f:
                f.write(json.dumps({"step": self.state.global_step, "samples": records}) + "\n")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs  # rows stay Python lists; the subclass's loss samples from them

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        raise NotImplementedError

    @classmethod
    def from_context(cls, ctx: Any, **extra: Any) -> RolloutTrainer:
        """The trainer for a run: prompt rows in, the runner's callbacks and optimizer. The caller
        has switched dropout off (sampling and scoring must see the policy the update sees)."""
        return cls(model=ctx.model, args=ctx.training_args, data_collator=keep_rows, train_dataset=ctx.data.train,
                   eval_dataset=ctx.data.eval, processing_class=ctx.tokenizer, callbacks=ctx.callbacks,
                   optimizers=ctx.optimizers, spec=ctx.spec, token_counter=ctx.data_collator, **extra)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        raise RuntimeError("rollout stages evaluate by generating (see evaluate)")
