"""End-to-end training on the tiny model: methods, outputs, resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.runner import run

from .conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow

DEMO = str(EXAMPLES / "data" / "demo_alpaca.json")


def small_spec(tmp_path: Path, **overrides) -> dict:
    spec = {
        "name": "t",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": DEMO, "format": "alpaca"}], "maxLength": 48, "evalSize": 16},
        "method": "full",
        "train": {"maxSteps": 6, "batchSize": 8, "learningRate": 1e-3},
        "checkpoint": {"everySteps": 3},
        "logging": {"everySteps": 1},
        "output": {"path": str(tmp_path / "out")},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def state_dict_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune.trainer.cli.main", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, **kwargs,
    )


def test_quickstart_learns_the_task(tmp_path):
    """The README's command, as-is: exits 0, and the final eval loss is < 60% of the first."""
    out = tmp_path / "quickstart"
    proc = cli("train", "examples/quickstart.yaml", "--set", f"output.path={out}")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(evals) >= 2
    assert evals[-1] < 0.6 * evals[0], evals
    for name in ("model.safetensors", "config.json", "tokenizer.json", "kubetune-spec.yaml", "metrics.jsonl", "loss.png", "status.json"):
        assert (out / name).is_file(), name
    resolved = yaml.safe_load((out / "kubetune-spec.yaml").read_text())
    assert resolved["name"] == "quickstart" and resolved["method"] == "full"
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_sft_schedule_decays_linearly_like_trl(tmp_path):
    """#17: sft's default `train.scheduler` is linear (transformers' and TRL's): with cosine, sft
    trailed TRL's held-out exact match at the same lr and steps (bench/quality.py)."""
    spec = small_spec(tmp_path, data={"evalSize": 0})
    run(validate_training(spec))
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "out") if "lr" in r}
    # the lr logged at step s is the one step s trained with: peak x (1 - (s - 1) / maxSteps)
    assert lrs == pytest.approx({s: 1e-3 * (1 - (s - 1) / 6) for s in range(1, 7)})


def test_freeze_trains_only_the_chosen_layers(tmp_path, tiny_model_dir):
    spec = validate_training(small_spec(tmp_path, method="freeze", freeze={"trainableLayers": 1, "trainableModules": ["model.norm"]}))
    result = run(spec)
    before, after = state_dict_of(tiny_model_dir), state_dict_of(result.output_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing trained"
    assert all(name.startswith("model.layers.1.") or name == "model.norm.weight" for name in changed), changed
    assert any(name.startswith("model.layers.1.") for name in changed)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])


def test_lora_changes_only_the_adapter_and_saves_it(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = validate_training(small_spec(tmp_path, method="lora", lora={"rank": 4}, train={"learningRate": 5e-3}))
    result = run(spec)
    out = result.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # only the adapter is saved, not a base copy
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())  # B starts at 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = PeftModel.from_pretrained(base, str(out))
    for name, tensor in loaded.get_base_model().state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(tensor, reference[clean]), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_sigterm_saves_a_checkpoint_and_rerun_resumes_from_it(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec = small_spec(tmp_path, train={"maxSteps": 400, "learningRate": 1e-3}, checkpoint={"everySteps": 5, "keepLast": 2},
                      logging={"everySteps": 5})
    spec["data"]["evalSize"] = 0
    spec_path.write_text(yaml.safe_dump(spec))
    out = Path(spec["output"]["path"])

    first = cli("train", str(spec_path))
    deadline = time.time() + 300
    while not (out / "checkpoint-5" / "kubetune-manifest.json").is_file():
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 143, output[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "Interrupted"
    stopped_at = status["step"]
    assert 5 <= stopped_at < 400
    assert (out / f"checkpoint-{stopped_at}" / "kubetune-manifest.json").is_file()

    second = cli("train", str(spec_path), "--set", "train.maxSteps=" + str(stopped_at + 5))
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    records = read_metrics(out)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    assert records[last_start]["resumedFrom"].endswith(f"checkpoint-{stopped_at}")
    resumed_steps = [r["step"] for r in records[last_start:] if "loss" in r]
    assert resumed_steps and min(resumed_steps) > stopped_at  # continued, did not start over
    assert json.loads((out / "status.json").read_text())["step"] == stopped_at + 5


def test_torchrun_two_processes(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec = small_spec(tmp_path, train={"maxSteps": 4, "batchSize": 4})
    spec_path.write_text(yaml.safe_dump(spec))
    out = Path(spec["output"]["path"])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", str(Path(sys.executable).parent / "kubetune"), "train", str(spec_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    start = next(r for r in read_metrics(out) if r.get("event") == "start")
    assert start["worldSize"] == 2
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["phase"] == "Succeeded"
    losses = [r for r in read_metrics(out) if "loss" in r]
    assert losses and losses[-1]["step"] == 4


def test_eval_block_evaluates_the_final_model(tmp_path):
    spec = small_spec(tmp_path, train={"maxSteps": 30, "learningRate": 3e-3})
    spec["eval"] = {"tasks": ["perplexity", "generation"], "maxSamples": 8, "maxNewTokens": 16}
    result = run(validate_training(spec))
    records = read_metrics(result.output_dir)
    evaluation = next(r for r in records if r.get("event") == "eval")
    tasks = {r["task"] for r in evaluation["results"]}
    assert tasks == {"perplexity", "generation"}
    assert (result.output_dir / "eval" / "eval_results.json").is_file()
    assert (result.output_dir / "eval" / "eval_results.md").read_text().strip()
