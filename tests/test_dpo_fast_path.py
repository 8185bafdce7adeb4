"""DPO's fast path: TRL's fused log-prob head scores only the answers' tokens (not the prompt and
padding) on every eager device, plainly where the logits are small and there is no Triton, and
the loss, rewards and gradients stay those of TRL's full computation (its tiled kernel over every
position); a short LoRA run with kubetune's default losses (DPO + the chosen answers' NLL) learns."""

from __future__ import annotations

import pytest
import torch


def _pairs(tokenizer, count: int) -> list[dict]:
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
    rows = []
    for i in range(count):
        prompt = tokenizer(f"User: name {' '.join(words[: 2 + i % 5])}\nAssistant:")["input_ids"]
        chosen = tokenizer(f" {words[i % 10]} {words[(i + 3) % 10]}")["input_ids"] + [tokenizer.eos_token_id]
        rejected = tokenizer(" " + " ".join(words[(i + k) % 10] for k in range(1 + i % 4)))["input_ids"]
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": [*rejected, tokenizer.eos_token_id]})
    return rows


def _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, **config):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from kubetune.trainer.train.stages.dpo import _trainer_class

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, disable_dropout=True, max_length=None, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, 1.0], logging_steps=1, save_strategy="no", **config)
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(_pairs(tiny_tokenizer, 16)),
                               processing_class=tiny_tokenizer, data_collator=DataCollatorForPreference(pad_token_id=0))
    trainer.model.delete_adapter("ref")  # as build_trainer: the reference is the base with adapters off
    trainer.model.set_adapter("default")
    return trainer


def _step(trainer, batch, labelled_only: bool, scored: list[int], monkeypatch):
    """Loss, this step's metrics and the LoRA gradients of one DPO step on `batch`; `scored`
    collects the number of positions each output-layer call scored."""
    import trl.trainer.utils as trl_utils

    from kubetune.trainer.train.stages._trl import LabelledLogProbs

    trainer.labelled_logits_only = labelled_only
    trainer.model.zero_grad()
    tiled, plain = trl_utils._ChunkedLogProbFunction, LabelledLogProbs.apply.__func__

    class Tiled(tiled):
        @staticmethod
        def forward(ctx, hidden, *args):
            scored.append(hidden.shape[0])
            return tiled.forward(ctx, hidden, *args)

    def counted(cls, hidden, *args):
        scored.append(hidden.shape[0])
        return plain(cls, hidden, *args)

    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_ChunkedLogProbFunction", Tiled)
        patch.setattr(LabelledLogProbs, "apply", classmethod(counted))
        loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def test_dpo_scores_answer_tokens_only_with_the_same_loss_rewards_and_gradients(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                                 monkeypatch):
    trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer)
    for name, param in trainer.model.named_parameters():  # a policy away from the reference: non-zero rewards
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trainer.model.train()
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(4))))
    answer_tokens = int(batch["completion_mask"][:, 1:].sum())
    fast_scored, full_scored = [], []
    fast = _step(trainer, batch, True, fast_scored, monkeypatch)
    full = _step(trainer, batch, False, full_scored, monkeypatch)
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert fast_scored == [answer_tokens, answer_tokens]  # the policy, then the reference (adapters off)
    assert full_scored == [positions, positions] and answer_tokens < positions / 2
    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "entropy", "logits/chosen", "mean_token_accuracy"):
        assert fast[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-6), key
    assert abs(fast[1]["rewards/margins"]) > 1e-3  # the policy differs from the reference: a real comparison
    assert fast[2].keys() == full[2].keys() and len(fast[2]) > 0
    for name, grad in fast[2].items():
        torch.testing.assert_close(grad, full[2][name], rtol=1e-4, atol=1e-6)


def test_dpo_with_the_default_nll_term_learns_in_a_short_run(tmp_path, tiny_model_dir, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, num_train_epochs=4, learning_rate=1e-2)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses  # from ~7 (mostly the NLL of a random model)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_plain_head_equals_trls_tiled_kernel_and_large_logits_stay_tiled(monkeypatch, softcap):
    from trl.kernels import ChunkedLogProbFunction

    from kubetune.trainer.train.stages import _trl

    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets, outputs = torch.randint(0, 300, (50,)), ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    monkeypatch.setattr(_trl.LabelledLogProbs, "tiled", ChunkedLogProbFunction)
    results = []
    for limit in (_trl.PLAIN_HEAD_MAX_BYTES, 0):  # plain, then over the limit: TRL's kernel
        monkeypatch.setattr(_trl, "PLAIN_HEAD_MAX_BYTES", limit)
        out = _trl.LabelledLogProbs.apply(hidden, weight, None, targets, 0.7, 128, softcap, 1.5, outputs)
        grads = torch.autograd.grad(out[0].sum(), (hidden, weight))
        results.append((out, grads))
    (plain, plain_grads), (tiled, tiled_grads) = results
    for a, b in zip(plain, tiled, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_grads, tiled_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
