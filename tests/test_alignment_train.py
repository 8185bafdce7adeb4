"""Alignment stages end to end on the tiny model: rm learns the synthetic preference task, dpo
(and reference-free SimPO) move a SFT model towards the chosen answers, LoRA dpo uses the base
with adapters disabled as its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.data.demo_preferences import demo_preferences
from kubetune.trainer.train.runner import run

from .test_train import DEMO, read_metrics

pytestmark = pytest.mark.slow

HELD_OUT = 40


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory) -> tuple[Path, Path]:
    """The demo preference pairs, split once into train and held-out files."""
    rows = demo_preferences()
    directory = tmp_path_factory.mktemp("prefs")
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[HELD_OUT:]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[:HELD_OUT]))
    return train, held_out


def train_sft(tmp_path_factory, steps: int) -> Path:
    out = tmp_path_factory.mktemp(f"sft{steps}") / "out"
    spec = {"name": "sft", "model": {"path": "builtin:tiny-llama"}, "method": "full",
            "data": {"datasets": [{"path": DEMO, "format": "alpaca"}], "maxLength": 48},
            # cosine: the starts below (and the numbers quoted for them) were measured with it; sft's
            # default is linear since #17, which leaves the 120-step start better trained
            "train": {"maxSteps": steps, "batchSize": 16, "learningRate": 3e-3, "scheduler": "cosine"},
            "checkpoint": {"everySteps": 1000}, "logging": {"everySteps": 10, "samples": 0}, "output": {"path": str(out)}}
    run(validate_training(spec))
    return out


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """A few dozen SFT steps on the demo task: the policy the alignment stages start from (held-out
    preference rate near chance, no held-out answer exactly right)."""
    return train_sft(tmp_path_factory, 40)


@pytest.fixture(scope="session")
def partly_trained_sft(tmp_path_factory) -> Path:
    """120 SFT steps: an under-trained start that answers some held-out prompts exactly (0.175 of
    them here) and prefers most chosen answers (0.875, mean margin 2.8 nats)."""
    return train_sft(tmp_path_factory, 120)


def stage_spec(stage: str, model: Path, files: tuple[Path, Path], out: Path, **blocks) -> dict:
    spec = {"name": stage, "stage": stage, "model": {"path": str(model)}, "method": "full",
            "data": {"datasets": [{"path": str(files[0])}], "evalDatasets": [{"path": str(files[1])}], "maxLength": 48},
            "train": {"maxSteps": 20, "batchSize": 16, "learningRate": 2e-4},
            "checkpoint": {"everySteps": 1000}, "logging": {"everySteps": 5, "samples": 2}, "output": {"path": str(out)}}
    for key, value in blocks.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def pair_logps(model_dir: Path, pairs_file: Path) -> list[tuple[float, int, float, int]]:
    """(log p(chosen), its tokens, log p(rejected), its tokens) of each pair under the saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.train.data.aligners import PreferenceAligner
    from kubetune.trainer.train.data.processors import PairwiseProcessor, ProcessorConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    aligner = PreferenceAligner()
    rows = [aligner.align_row(json.loads(line), {"prompt": "instruction", "input": None, "system": None, "chosen": "chosen",
                                                  "rejected": "rejected", "tools": None})
            for line in pairs_file.read_text().splitlines()]
    tokens = PairwiseProcessor(tokenizer, ProcessorConfig(max_length=64))({k: [r[k] for r in rows] for k in rows[0]})

    def logp(prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())

    return [(logp(p, c), len(c), logp(p, r), len(r)) for p, c, r in zip(tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"], strict=True)]


def preference_stats(model_dir: Path, pairs_file: Path) -> tuple[float, float]:
    """(mean of log p(chosen) - log p(rejected), share of pairs where chosen is likelier) on held-out pairs."""
    margins = [c - r for c, _, r, _ in pair_logps(model_dir, pairs_file)]
    return sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)


def simpo_accuracy(model_dir: Path, pairs_file: Path, batch: int = 16) -> float:
    """SimPO's own accuracy: the share of pairs whose chosen answer has the higher mean token
    log-probability, averaged per eval batch of `batch` pairs in file order as the trainer logs it."""
    wins = [c / nc > r / nr for c, nc, r, nr in pair_logps(model_dir, pairs_file)]
    chunks = [wins[i:i + batch] for i in range(0, len(wins), batch)]
    return sum(sum(chunk) / len(chunk) for chunk in chunks) / len(chunks)


def test_reward_model_ranks_held_out_pairs(tmp_path, sft_model, preference_files):
    from transformers import AutoModelForSequenceClassification

    spec = stage_spec("rm", sft_model, preference_files, tmp_path / "rm",
                      train={"maxSteps": 300, "learningRate": 1e-3, "evalEverySteps": 150}, logging={"samples": 0})
    result = run(validate_training(spec))
    evals = [r for r in read_metrics(result.output_dir) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert evals[-1]["eval_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"]
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir)  # loadable by path
    assert model.config.num_labels == 1
    assert json.loads((result.output_dir / "status.json").read_text())["phase"] == "Succeeded"


# Margins that hold across machines and seeds (#17 item 12). From the 40-step start (preference
# rate 0.525, near chance) a 60-step run is a coin toss: over train.seed 42/1/2 the held-out margin
# rose by +1.9/+0.0/+0.9 nats (sigmoid) and +3.3/+0.4/+3.4 (simpo), and a +0.1 win-rate threshold
# failed on another machine. From the 120-step start the direction is settled over seeds 42/1/2:
# +4.6/+4.6/+4.3 nats (sigmoid), +5.1/+5.5/+4.9 (simpo), +3.1/+2.7 (orpo, 42/1), with 1 or 2 torch
# threads alike, so the test asks for +2 nats; the win rate, already 0.875 (35/40 pairs), must not
# fall (it ended at 0.875-1.0). Plain DPO (rpoAlpha 0) is kept here: its held-out chosen
# log-probability collapses (-4.4 -> -10.9/-17.4/-9.7), which the collapse warning must say.
@pytest.mark.parametrize(("loss", "blocks"), [
    ("sigmoid", {"dpo": {"lossType": "sigmoid", "beta": 0.5, "rpoAlpha": 0.0}}),
    ("simpo", {"dpo": {"lossType": "simpo", "beta": 2.0, "simpoGamma": 0.5, "rpoAlpha": 0.0}}),
    ("orpo", {"dpo": {"lossType": "orpo", "beta": 2.0}}),
])
def test_dpo_prefers_chosen_more_than_the_sft_model(tmp_path, partly_trained_sft, preference_files, loss, blocks, caplog):
    start = partly_trained_sft
    before_margin, before_rate = preference_stats(start, preference_files[1])
    with caplog.at_level("WARNING", logger="kubetune.trainer.train.stages.dpo"):
        result = run(validate_training(stage_spec("dpo", start, preference_files, tmp_path / loss,
                                                  train={"maxSteps": 60, "learningRate": 1e-3}, **blocks)))
    after_margin, after_rate = preference_stats(result.output_dir, preference_files[1])
    assert after_margin > before_margin + 2.0, (before_margin, after_margin)
    assert after_rate >= before_rate, (before_rate, after_rate)
    evals = [r for r in read_metrics(result.output_dir) if "eval_rewards/accuracies" in r]
    assert evals and evals[0]["step"] == 0
    assert any(r.get("when") == "after" for r in map(json.loads, (result.output_dir / "samples.jsonl").read_text().splitlines()))
    if loss == "sigmoid":
        assert evals[0]["eval_rewards/accuracies"] == 0.5  # policy == reference: every pair ties (#17 item 4)
        assert "eval_chosen_exact_match" in evals[0] and "eval_logps/rejected" in evals[-1]
        assert any("eval_logps/chosen fell from" in r.getMessage() for r in caplog.records)
    if loss == "simpo":  # SimPO's own accuracy, not a log-ratio to the placeholder reference (#17 item 9)
        assert evals[0]["eval_rewards/accuracies"] == pytest.approx(simpo_accuracy(start, preference_files[1]), abs=0.05)  # one pair may flip
        assert evals[-1]["eval_rewards/accuracies"] == pytest.approx(simpo_accuracy(result.output_dir, preference_files[1]), abs=0.05)  # one pair may flip


def test_dpo_raises_preference_accuracy_without_losing_exact_match(tmp_path, partly_trained_sft, preference_files, caplog):
    """#17 item 4's acceptance: from an under-trained start, DPO with its defaults (beta 0.1, the
    chosen-NLL guard rpoAlpha 1) raises held-out preference accuracy while greedy exact match on
    the held-out prompts stays at least where it started: over train.seed 42/1/2 accuracy 0.875 ->
    0.975/1.0/0.975, exact match 0.175 -> 0.275/0.375/0.30. (Plain DPO at beta 0.5 reached 1.0
    while exact match fell to 0.025 and log p(chosen) from -4.4 to -10.9.)"""
    _, before_rate = preference_stats(partly_trained_sft, preference_files[1])
    with caplog.at_level("WARNING", logger="kubetune.trainer.train.stages.dpo"):
        result = run(validate_training(stage_spec("dpo", partly_trained_sft, preference_files, tmp_path / "rpo",
                                                  train={"maxSteps": 60, "learningRate": 1e-3}, logging={"samples": 0})))
    _, after_rate = preference_stats(result.output_dir, preference_files[1])
    assert after_rate > before_rate, (before_rate, after_rate)
    evals = [r for r in read_metrics(result.output_dir) if "eval_chosen_exact_match" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 60 and start["eval_chosen_exact_match"] > 0
    assert end["eval_chosen_exact_match"] >= start["eval_chosen_exact_match"], evals
    assert end["eval_logps/chosen"] > start["eval_logps/chosen"] - 1.0  # the chosen answers stay likely
    assert not any("fell from" in r.getMessage() for r in caplog.records)


def test_preference_metrics_count_ties_half_and_simpo_reports_its_own_reward() -> None:
    """#17 items 4 and 9: a tie is neither a win nor a loss; SimPO's reward is its own
    length-normalised log-likelihood, not a log-ratio to the placeholder reference."""
    from kubetune.trainer.train.stages.dpo import chosen_collapsed, preference_rewards, reward_metrics

    logps = (torch.tensor([-4.0, -9.0, -6.0]), torch.tensor([-6.0, -4.0, -3.0]))
    lengths = (torch.tensor([2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 2.0]))
    start = reward_metrics(*preference_rewards("sigmoid", 0.1, logps, lengths, reference=logps))  # policy == reference
    assert start == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.5}
    dpo = reward_metrics(*preference_rewards("sigmoid", 0.5, logps, lengths, reference=(torch.full((3,), -5.0), torch.full((3,), -5.0))))
    assert dpo["rewards/accuracies"] == pytest.approx(1 / 3)  # only pair 0 gained more on chosen than on rejected
    simpo = reward_metrics(*preference_rewards("simpo", 2.0, logps, lengths, reference=None))
    # mean token log-probs: chosen -2, -3, -1.5; rejected -3, -4, -1.5 -> two wins and a tie
    assert simpo["rewards/accuracies"] == pytest.approx(2.5 / 3)
    assert simpo["rewards/chosen"] == pytest.approx(2.0 * (-2 - 3 - 1.5) / 3)
    assert simpo["rewards/margins"] == pytest.approx(2.0 * (1 + 1 + 0) / 3)
    assert chosen_collapsed(-1.45, -11.8) and chosen_collapsed(-12.9, -33.5)
    assert not chosen_collapsed(-12.9, -10.7) and not chosen_collapsed(-12.9, -20.0) and not chosen_collapsed(-0.5, -1.2)


def test_batched_greedy_answers_equal_one_at_a_time(sft_model) -> None:
    """eval_chosen_exact_match answers held-out prompts in left-padded batches: the answers must be
    the ones generated one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.train.samples import generate_samples, greedy_completions

    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    model = AutoModelForCausalLM.from_pretrained(sft_model)
    questions = ["Add 2 and 3.", "What is the capital of France?", "Opposite of hot?", "Give the antonym of young."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for q in questions]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    one_by_one = [s["completion"] for s in generate_samples(model, tokenizer, prompts, max_new_tokens=16)]
    assert greedy_completions(model, tokenizer, prompts, max_new_tokens=16, batch_size=4) == one_by_one


def test_lora_dpo_uses_the_base_with_adapters_disabled(tmp_path, sft_model, preference_files, monkeypatch):
    from safetensors.torch import load_file

    from kubetune.trainer.train.stages import dpo

    built = []
    original = dpo.build_trainer
    monkeypatch.setattr(dpo, "build_trainer", lambda ctx: built.append(original(ctx)) or built[-1])
    spec = stage_spec("dpo", sft_model, preference_files, tmp_path / "lora", method="lora", lora={"rank": 4},
                      train={"maxSteps": 6, "learningRate": 1e-3}, logging={"samples": 0})
    result = run(validate_training(spec))
    trainer = built[0]
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # no model or adapter copy
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert adapter and all(".ref." not in name for name in adapter)
    assert not (result.output_dir / "model.safetensors").exists()


def test_kto_learns_from_unpaired_judgements(tmp_path, sft_model, preference_files):
    """The same pairs, unpaired (kto splits each pair into a desirable and an undesirable answer,
    each judged alone): KTO moves the SFT model's held-out log-likelihood margin towards the
    desirable answers."""
    before_margin, before_rate = preference_stats(sft_model, preference_files[1])
    spec = stage_spec("kto", sft_model, preference_files, tmp_path / "kto", train={"maxSteps": 60, "learningRate": 1e-3},
                      kto={"beta": 0.1}, logging={"samples": 0})
    spec["data"] = {"datasets": [{"path": str(preference_files[0])}], "evalSize": 16, "maxLength": 48}
    result = run(validate_training(spec))
    start = next(r for r in read_metrics(result.output_dir) if r.get("event") == "start")
    assert start["data"]["sources"][0]["format"] == "preference"
    assert start["data"]["sources"][0]["rows"] == 2 * len(preference_files[0].read_text().splitlines())  # two rows per pair
    after_margin, after_rate = preference_stats(result.output_dir, preference_files[1])
    assert after_margin > before_margin + 0.5, (before_margin, after_margin, before_rate, after_rate)
    assert after_rate >= before_rate, (before_rate, after_rate)  # KTO sees no pair: its signal is weaker than DPO's
    assert any("eval_rewards/margins" in r for r in read_metrics(result.output_dir))
