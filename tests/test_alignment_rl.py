"""The stages that learn from rewards (raft, ppo, grpo), kto, pipelines, and their bad inputs.

Everything runs on the tiny builtin model with the demo task and the word-overlap reward against
each prompt's reference answer, so the reward is cheap, deterministic and informative from the
first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kubetune.trainer.api.errors import SpecError, SpecErrors
from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.cli.main import main
from kubetune.trainer.train.data.demo_preferences import demo_preferences
from kubetune.trainer.train.preflight import preflight
from kubetune.trainer.train.reward_functions import exact_match, word_f1
from kubetune.trainer.train.rewards import distinct_n, import_function
from kubetune.trainer.train.runner import run
from kubetune.trainer.train.stages.ppo import gae
from kubetune.trainer.train.stages.raft import select_kept

from .test_train import DEMO, read_metrics

ROOT = Path(__file__).resolve().parents[1]

REWARD = "kubetune.trainer.train.reward_functions:word_f1"


def rl_spec(stage: str, out: Path, **blocks) -> dict:
    spec = {"name": stage, "stage": stage, "model": {"path": "builtin:tiny-llama"}, "method": "full",
            "data": {"datasets": [{"path": DEMO, "format": "alpaca"}], "evalSize": 16, "maxLength": 48},
            "reward": {"function": REWARD}, "generation": {"maxNewTokens": 16, "samplesPerPrompt": 4},
            "train": {"maxSteps": 30, "batchSize": 8, "learningRate": 3e-3, "evalEverySteps": 15},
            "checkpoint": {"everySteps": 1000}, "logging": {"everySteps": 5, "samples": 0}, "output": {"path": str(out)}}
    for key, value in blocks.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def evals(out: Path, key: str = "eval_reward") -> list[float]:
    return [r[key] for r in read_metrics(out) if key in r]


# -- units ------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computation() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])  # the last position is past the answer's end
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.1, 0.0]]))


def test_raft_keeps_the_best_answer_per_prompt_or_the_top_fraction() -> None:
    rewards = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.0])  # 3 prompts x 2 samples, mean 0.383
    assert select_kept(rewards, 2, "best", 1.0, min_reward=0.0) == [1, 2, 4]
    assert select_kept(rewards, 2, "best", 1.0) == [1, 4]  # prompt 2's best (0.3) is below the mean
    assert select_kept(rewards, 2, "topFraction", 0.5, min_reward=0.0) == [1, 2, 4]  # the 3 best of all 6, in batch order
    assert select_kept(rewards, 2, "topFraction", 0.2) == [1, 4]
    assert select_kept(rewards, 2, "best", 1.0, min_reward=0.85) == [1]


def test_raft_never_keeps_a_failed_answer_as_its_prompts_best() -> None:
    """#17 item 3: `keep: best` used to keep each prompt's top sample even when all scored 0."""
    assert select_kept(torch.zeros(8), 4, "best", 1.0) == []
    assert select_kept(torch.ones(8), 4, "topFraction", 0.5) == []  # all alike: nothing ranks above the rest
    assert select_kept(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]), 3, "best", 1.0) == [3]


def test_builtin_rewards_and_diversity() -> None:
    assert exact_match(["p"], [" Paris "], reference=["paris"]) == [1.0]
    assert word_f1(["p", "p"], ["the capital is Paris", "no"], reference=["Paris", "Paris"]) == [pytest.approx(0.4), 0.0]
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


# -- stages end to end ------------------------------------------------------------------------
def sample_rewards(out: Path) -> list[float]:
    """The mean reward of each logged stretch of iterations' samples, in order."""
    return [r["reward"] for r in read_metrics(out) if "reward" in r and "eval_reward" not in r]


@pytest.mark.slow
def test_raft_raises_the_held_out_reward(tmp_path: Path) -> None:
    """#17 item 3: the samples' mean reward rises over the iterations and the held-out greedy
    reward beats its start (here 0.02 -> 0.18 and 0.01 -> 0.09 by step 15)."""
    out = tmp_path / "raft"
    run(validate_training(rl_spec("raft", out)))
    rewards = evals(out)
    assert len(rewards) >= 3  # before training, mid-way, at the end
    assert rewards[-1] > rewards[0] + 0.05, rewards
    trend = sample_rewards(out)
    assert sum(trend[-3:]) / 3 > trend[0] + 0.05, trend
    records = [r for r in read_metrics(out) if "kept_reward" in r]
    assert records and all(r["kept_reward"] >= r["reward"] for r in records)  # RAFT keeps the better answers
    assert all(0 < r["kept_fraction"] <= 1 for r in records)
    assert all(0 < r["distinct_1"] <= 1 and 0 < r["distinct_2"] <= 1 for r in records)
    kept = [json.loads(line) for line in (out / "raft_kept.jsonl").read_text().splitlines()]
    assert 0 < len(kept) <= 30 * 8 and {"prompt", "completion", "reward"} <= set(kept[0])  # at most one per prompt per iteration
    assert all(k["reward"] > 0 for k in kept)  # a zero-reward answer is never trained on, even as its prompt's best
    assert (out / "model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_raft_iterations_that_keep_nothing_leave_the_model_unchanged(tmp_path: Path) -> None:
    """Every answer scores 0: nothing is above the mean, nothing is kept, and no step moves a
    weight (no gradient at all, so neither momentum nor weight decay acts)."""
    from safetensors.torch import load_file

    from kubetune.trainer.train.models.locations import resolve_location

    rewards = tmp_path / "zero_reward.py"
    rewards.write_text("def score(prompts, completions, **columns):\n    return [0.0] * len(completions)\n")
    out = tmp_path / "raft"
    spec = validate_training(rl_spec("raft", out, reward={"function": f"{rewards}:score"},
                                     train={"maxSteps": 3, "evalEverySteps": None, "weightDecay": 0.1}))
    run(spec)
    start = load_file(str(Path(resolve_location("builtin:tiny-llama", spec.storage, "model.path")) / "model.safetensors"))
    end = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(start[name], end[name]) for name in start)
    assert not (out / "raft_kept.jsonl").exists() or not (out / "raft_kept.jsonl").read_text().strip()
    assert all(r["kept_fraction"] == 0 for r in read_metrics(out) if "kept_fraction" in r)


@pytest.mark.slow
def test_grpo_raises_the_sample_reward_from_an_sft_start(tmp_path: Path, tmp_path_factory) -> None:
    """#17 item 3's check for GRPO: from a start that answers partly right (40 SFT steps), the
    samples' mean reward rises over 30 steps (train.seed 42 and 1 here: +0.10 from the first two logged
    stretches to the last three)."""
    from .test_alignment_train import train_sft

    start = train_sft(tmp_path_factory, 40)
    out = tmp_path / "grpo"
    run(validate_training(rl_spec("grpo", out, model={"path": str(start)}, train={"learningRate": 3e-4})))
    trend = sample_rewards(out)
    assert len(trend) >= 5 and sum(trend[-3:]) / 3 > sum(trend[:2]) / 2 + 0.03, trend


@pytest.mark.slow
def test_ppo_raises_the_sample_reward_from_an_sft_start(tmp_path: Path, tmp_path_factory) -> None:
    """The same check for PPO: fresh rollouts every step (ppo.epochs 1) for 60 steps from the
    40-step SFT start. With klCoef 0.01 the reward rose +0.10/+0.09 (train.seed 42/1; klCoef 0:
    +0.10/+0.12); at the default 0.05 the summed per-token KL penalty outweighs this word-overlap
    reward and it rose only ~+0.03 before levelling off."""
    from .test_alignment_train import train_sft

    start = train_sft(tmp_path_factory, 40)
    out = tmp_path / "ppo"
    run(validate_training(rl_spec("ppo", out, model={"path": str(start)}, ppo={"epochs": 1, "klCoef": 0.01},
                                  train={"maxSteps": 60, "learningRate": 3e-4, "evalEverySteps": None})))
    trend = sample_rewards(out)
    assert len(trend) >= 10 and sum(trend[-3:]) / 3 > sum(trend[:2]) / 2 + 0.04, trend


@pytest.mark.slow
def test_ppo_with_lora_trains_saves_and_resumes_its_value_head(tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    spec = rl_spec("ppo", out, method="lora", train={"maxSteps": 6, "learningRate": 5e-3, "evalEverySteps": None},
                   checkpoint={"everySteps": 3}, logging={"everySteps": 1}, ppo={"epochs": 2})
    run(validate_training(spec))
    steps = [r for r in read_metrics(out) if "policy_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"value_loss", "clip_fraction", "approx_kl"} <= set(r) for r in steps)
    # Each rollout batch serves ppo.epochs=2 updates: rewards are sampled on steps 1, 3, 5.
    rollouts = [r for r in steps if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 3, 5] and all("kl" in r for r in rollouts)
    # The reference is the base with the adapter disabled: identical to the policy at the start.
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(r["kl"] > 0 for r in rollouts[1:])
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # the first update is on-policy
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.pt").is_file()
    head = torch.load(out / "checkpoint-6" / "value_head.pt")
    assert head["weight"].abs().sum() > 0  # the critic learned (it starts at zero)

    resumed = run(validate_training({**spec, "train": {**spec["train"], "maxSteps": 9}}))
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-6")
    assert resumed.global_step == 9


@pytest.mark.slow
def test_grpo_runs_end_to_end_and_logs_its_reward(tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    run(validate_training(rl_spec("grpo", out, method="lora", train={"maxSteps": 6, "evalEverySteps": None})))
    rewards = [r for r in read_metrics(out) if "reward" in r and "eval_reward" not in r]
    assert rewards and all(0 <= r["reward"] <= 1 for r in rewards)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["phase"] == "Succeeded"


@pytest.mark.slow
def test_pipeline_example_runs_sft_then_dpo_and_a_rerun_skips_finished_steps(tmp_path: Path) -> None:
    """examples/pipeline-sft-dpo.yaml, shortened: one `kubetune train`, two stages."""
    out = tmp_path / "pipe"
    cmd = [sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(ROOT / "examples" / "pipeline-sft-dpo.yaml"),
           "--set", f"output.path={out}", "--set", "train.maxSteps=8", "--set", "pipeline.1.train.maxSteps=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("0-sft", "1-dpo"):
        assert json.loads((out / step / "status.json").read_text())["phase"] == "Succeeded"
    dpo_spec = yaml.safe_load((out / "1-dpo" / "kubetune-spec.yaml").read_text())
    assert (dpo_spec["stage"], dpo_spec["model"]["path"]) == ("dpo", str(out / "0-sft"))
    assert any("eval_rewards/margins" in r or "rewards/margins" in r for r in read_metrics(out / "1-dpo"))
    root = json.loads((out / "status.json").read_text())  # what the operator reads
    assert (root["phase"], root["outputUri"]) == ("Succeeded", str(out / "1-dpo"))

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    outcomes = [s["outcome"] for s in json.loads((out / "pipeline.json").read_text())["steps"]]
    assert outcomes == ["skipped (already succeeded)"] * 2


# -- bad inputs fail before training ----------------------------------------------------------
def _fields(exc: SpecErrors) -> list[str]:
    return [e.field for e in exc.errors]


def test_reward_function_that_does_not_import_is_refused_up_front(tmp_path: Path, capsys, monkeypatch) -> None:
    spec = validate_training(rl_spec("raft", tmp_path, reward={"function": "no_such_module_xyz:score"}))
    with pytest.raises(SpecErrors) as caught:
        preflight(spec)
    assert _fields(caught.value) == ["reward.function"]
    assert "no_such_module_xyz" in str(caught.value)
    with pytest.raises(SpecError, match="has no function"):
        import_function("kubetune.trainer.train.reward_functions:nope")
    spec_file = tmp_path / "raft.yaml"
    spec_file.write_text(yaml.safe_dump(rl_spec("raft", tmp_path / "out", reward={"function": "no_such_module_xyz:score"})))
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(["train", str(spec_file)]) == 2  # `kubetune train`, in-process: an uncaught error would propagate
    assert "reward.function" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    bad_signature = tmp_path / "rewards.py"
    bad_signature.write_text("def score(x):\n    return [0.0]\n")
    with pytest.raises(SpecError, match="cannot be called"):
        import_function(f"{bad_signature}:score")


def test_reward_model_path_that_does_not_exist_is_refused_up_front(tmp_path: Path) -> None:
    spec = validate_training(rl_spec("ppo", tmp_path, reward={"function": None, "model": str(tmp_path / "missing-rm")}))
    with pytest.raises(SpecErrors) as caught:
        preflight(spec)
    assert _fields(caught.value) == ["reward.model"]


def test_rollout_stage_without_a_reward_and_bad_pipeline_steps_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecErrors, match="needs a reward"):
        validate_training(rl_spec("grpo", tmp_path, reward={"function": None}))
    with pytest.raises(SpecErrors, match=r"pipeline\[1\] \(stage raft\).*needs a reward"):
        validate_training({**rl_spec("sft", tmp_path), "reward": {}, "pipeline": [{"stage": "sft"}, {"stage": "raft"}]})


def test_preference_data_without_rejected_fails_before_the_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "chosen-only.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a"}) + "\n" for i in range(4)))
    spec = {"name": "dpo", "stage": "dpo", "model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": str(data)}]},
            "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(SpecError) as caught:
        run(validate_training(spec))
    assert caught.value.field.startswith("data.datasets[0]") and "rejected" in str(caught.value)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_alignment_job_reward_model_from_fills_the_reward_model() -> None:
    from kubetune.operator.resources import AlignmentJobSpec
    from kubetune.operator.training.render import resolved_manifest

    cr = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "raft", "namespace": "ml"},
          "spec": {"baseModelFrom": {"fineTuneJob": "sft"}, "rewardModelFrom": {"alignmentJob": "rm"},
                   "training": {"stage": "raft", "data": {"datasets": [{"path": "s3://data/prompts.jsonl"}]}}}}
    spec = AlignmentJobSpec.model_validate(cr["spec"])
    body = resolved_manifest(cr, spec, {"baseModelFrom": "s3://out/sft", "rewardModelFrom": "s3://out/rm"})
    training = body["spec"]["training"]
    assert training["model"]["path"] == "s3://out/sft"
    assert training["reward"]["model"] == "s3://out/rm"
    with pytest.raises(ValueError, match="rewardModelFrom is for the stages"):
        AlignmentJobSpec.model_validate({**cr["spec"], "training": {**cr["spec"]["training"], "stage": "dpo"}})


@pytest.mark.slow
def test_a_lora_reward_model_shares_the_policy_base_and_scores_like_the_merged_model(tmp_path: Path) -> None:
    """A LoRA `rm` output as `reward.model`: loaded on its own it is merged into its base; for a
    LoRA policy on the same base it becomes the policy's second adapter. Both score alike."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.train.models.methods import apply_method
    from kubetune.trainer.train.rewards import REWARD_ADAPTER, ModelScorer, SharedAdapterScorer, load_scorer

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in demo_preferences()[:64]))
    rm_out = tmp_path / "rm"
    run(validate_training({"name": "rm", "stage": "rm", "model": {"path": "builtin:tiny-llama"}, "method": "lora",
                           "data": {"datasets": [{"path": str(prefs)}], "maxLength": 48},
                           "train": {"maxSteps": 3, "batchSize": 8, "learningRate": 1e-2},
                           "checkpoint": {"everySteps": 1000}, "logging": {"samples": 0}, "output": {"path": str(rm_out)}}))
    assert (rm_out / "adapter_config.json").is_file()

    spec = validate_training(rl_spec("ppo", tmp_path / "ppo", method="lora", reward={"function": None, "model": str(rm_out)}))
    prompts = ["<|user|>Add 2 and 3.<|assistant|>", "<|user|>What is the capital of France?<|assistant|>"]
    answers = ["2 plus 3 is 5, five.", "The capital of France is Lyon."]
    standalone = load_scorer(spec)
    assert isinstance(standalone, ModelScorer)

    from kubetune.trainer.train.models.locations import resolve_location

    base = AutoModelForCausalLM.from_pretrained(resolve_location("builtin:tiny-llama", spec.storage, "model.path"))
    policy = apply_method(base, spec)
    assert isinstance(policy, PeftModel)
    shared = load_scorer(spec, policy=policy)
    assert isinstance(shared, SharedAdapterScorer)
    assert shared(prompts, answers) == pytest.approx(standalone(prompts, answers), abs=1e-4)
    assert policy.active_adapter == "default"  # scoring hands the policy back as it was
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(f".{REWARD_ADAPTER}." not in n for n in trainable)
