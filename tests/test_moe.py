"""Mixture-of-experts models: a tiny Mixtral (`builtin:tiny-mixtral`) trains with the router's
load-balancing loss in the loss and in metrics.jsonl, LoRA on the expert weights when asked, and
under DeepSpeed ZeRO-3 across two processes with its MoE blocks as leaf modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.runner import run

from .test_train import read_metrics, small_spec


def moe_spec(tmp_path: Path, **overrides) -> dict:
    return small_spec(tmp_path, model={"path": "builtin:tiny-mixtral"}, method="lora",
                      lora={"rank": 4, "targetParameters": ["experts.gate_up_proj", "experts.down_proj"]},
                      train={"maxSteps": 10, "batchSize": 8, "learningRate": 1e-2},
                      checkpoint={"everySteps": 10}, logging={"everySteps": 1, "samples": 0}, **overrides)


@pytest.mark.slow
def test_lora_on_the_experts_trains_with_the_router_loss_logged(tmp_path):
    result = run(validate_training(moe_spec(tmp_path)))
    records = read_metrics(result.output_dir)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 10 and all(r["aux_loss"] > 0 for r in steps), steps
    # Top-2 of 4 experts: a perfectly balanced router scores 2.0 (Switch's loss x top-k); it stays near.
    assert all(1.5 < r["aux_loss"] < 4.0 for r in steps), [r["aux_loss"] for r in steps]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < 0.9 * evals[0], evals
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    # PEFT nests one wrapper per targeted parameter: A and B of gate_up_proj and of down_proj, per layer,
    # each holding rank x experts rows (the 4 experts' adapters side by side).
    experts = {name: tensor.shape for name, tensor in adapter.items() if ".mlp.experts." in name}
    assert len(experts) == 2 * 2 * 2, sorted(adapter)
    assert all(min(shape) % (4 * 4) == 0 for shape in experts.values()), experts


@pytest.mark.slow
def test_zero3_two_processes_with_experts_as_leaf_modules(tmp_path):
    """ZeRO-3 across two processes: the MoE blocks are DeepSpeed leaf modules (gathered whole, the
    same on both ranks whatever the routing), the run finishes, the router loss is logged and the
    expert adapters are saved, gathered from both ranks' shards."""
    from .test_distributed import torchrun

    spec = moe_spec(tmp_path, distributed={"deepspeed": {"stage": 3}}, data={"evalSize": 0})
    spec["train"] = {**spec["train"], "maxSteps": 4, "batchSize": 4}
    spec["checkpoint"] = {"everySteps": 4}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = torchrun(spec_path, nproc=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ZeRO-3 leaf modules: MixtralSparseMoeBlock" in proc.stdout + proc.stderr
    out = Path(spec["output"]["path"])
    records = read_metrics(out)
    assert next(r for r in records if r.get("event") == "start")["worldSize"] == 2
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["aux_loss"] > 0 for r in steps), steps
    adapter = load_file(str(out / "adapter_model.safetensors"))
    experts = [tensor for name, tensor in adapter.items() if ".mlp.experts." in name]
    assert len(experts) == 8 and all(t.numel() > 0 and torch.isfinite(t).all() for t in experts)
