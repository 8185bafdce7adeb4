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
                      lora={"rank": 4, "targetModules": ["q_proj", "v_proj"],
                            "targetParameters": ["experts.gate_up_proj", "experts.down_proj"]},
                      train={"maxSteps": 10, "batchSize": 8, "learningRate": 1e-2},
                      checkpoint={"everySteps": 10}, logging={"everySteps": 1, "samples": 0}, **overrides)


def test_router_loss_in_training_forwards_only_and_leaf_blocks_under_zero3(tmp_path):
    """`prepare_moe`: the aux loss comes with training forwards (and joins the loss computed at
    labelled positions), not with evaluation or generation; under ZeRO-3 the MoE blocks are leaves."""
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.train.models.builtin import resolve_builtin
    from kubetune.trainer.train.models.moe import aux_loss_term, prepare_moe, router_aux_enabled
    from kubetune.trainer.train.stages.causal_lm import labelled_logits_loss

    model = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-mixtral"))
    spec = validate_training(moe_spec(tmp_path, distributed={"deepspeed": {"stage": 3}}, moe={"auxLossCoef": 0.5}))
    prepare_moe(model, spec)
    assert router_aux_enabled(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    assert len(blocks) == 2 and all(getattr(b, "_z3_leaf", False) for b in blocks)
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    labels = torch.tensor([[-100, -100, 70, 80, 90, 100]])
    model.train()
    outputs = model(ids)
    assert outputs.aux_loss is not None
    assert float(aux_loss_term(model, outputs).detach()) == pytest.approx(0.5 * float(outputs.aux_loss.detach()))
    with_aux = labelled_logits_loss(model, {"input_ids": ids, "labels": labels})
    own = model(ids, labels=labels).loss  # the model's own loss adds the same term
    assert float(with_aux) == pytest.approx(float(own), rel=1e-5)
    model.eval()
    with torch.no_grad():
        assert model(ids).aux_loss is None
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


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


def test_default_lora_adapts_the_experts_without_dropout_and_an_explicit_dropout_is_refused(tmp_path):
    """PEFT's `all-linear` adds an MoE model's expert parameters, whose adapters take no dropout:
    the default `lora` works (dropout 0 there), a `lora.dropout` set by hand is refused by name."""
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.api.errors import SpecError
    from kubetune.trainer.train.models.builtin import resolve_builtin
    from kubetune.trainer.train.models.methods import apply_lora

    def model():
        return AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-mixtral"))

    base = {"model": {"path": "builtin:tiny-mixtral"}, "data": {"datasets": [{"path": "x.json"}]}}
    wrapped = apply_lora(model(), validate_training(base))
    assert wrapped.peft_config["default"].lora_dropout == 0.0
    assert any(".experts." in name and "lora_A" in name for name, _ in wrapped.named_parameters())
    # PEFT fuses the w1/w3 adapters into gate_up_proj at twice the rank (its own rank pattern, which
    # it then calls unmatched: kubetune silences that warning, methods.PEFT_NOISE); 4 experts stacked.
    shapes = {name: tuple(p.shape) for name, p in wrapped.named_parameters()}
    rank = wrapped.peft_config["default"].r
    assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight"][0] == 4 * 2 * rank
    assert shapes["base_model.model.model.layers.0.mlp.experts.lora_A.default.weight"][0] == 4 * rank
    with pytest.raises(SpecError, match=r"^lora\.dropout: "):
        apply_lora(model(), validate_training({**base, "lora": {"dropout": 0.1}}))
