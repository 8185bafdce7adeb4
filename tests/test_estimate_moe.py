"""`kubetune estimate` on mixture-of-experts models: total vs active parameters, checked against
the published counts of Mixtral-8x7B and Qwen1.5-MoE-A2.7B, and on the builtin tiny Mixtral."""

from __future__ import annotations

import json

import pytest

from kubetune.trainer.api.estimate import KNOWN_SHAPES, shape_for_path, shape_from_config

from .test_estimate import run_cli

QWEN_MOE_A2_7B = {  # Qwen/Qwen1.5-MoE-A2.7B's config.json
    "model_type": "qwen2_moe", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 151936, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "tie_word_embeddings": False,
}


def test_active_and_total_parameters_match_the_published_counts():
    mixtral = KNOWN_SHAPES["mixtral-8x7b"]  # "46.7B total parameters, 12.9B used per token"
    assert mixtral.parameters == pytest.approx(46.7e9, rel=0.005)
    assert mixtral.active_parameters == pytest.approx(12.9e9, rel=0.005)
    qwen = shape_from_config(QWEN_MOE_A2_7B)  # "14.3B parameters, 2.7B activated" (expert width 1408 + a shared expert)
    assert qwen.parameters == pytest.approx(14.3e9, rel=0.005)
    assert qwen.active_parameters == pytest.approx(2.7e9, rel=0.01)
    dense = KNOWN_SHAPES["llama-2-7b"]
    assert dense.active_parameters == dense.parameters


def test_the_cli_reports_experts_and_active_parameters(tmp_path, capsys):
    spec = tmp_path / "moe.yaml"
    spec.write_text("model: {path: 'builtin:tiny-mixtral'}\ndata: {datasets: [{path: x.json}], maxLength: 64}\n")
    shape = shape_for_path("builtin:tiny-mixtral")
    assert (shape.experts, shape.active_experts) == (4, 2) and shape.active_parameters < shape.parameters
    code, text = run_cli(str(spec), "--gpus-per-node", "1", capsys=capsys)
    assert code == 0 and "experts    4 per layer, 2 per token" in text, text
    report = json.loads(run_cli(str(spec), "--gpus-per-node", "1", "--json", capsys=capsys)[1])
    assert report["experts"] == 4 and report["activeExperts"] == 2
    assert report["activeParameters"] < report["parameters"]


def test_lora_on_named_expert_parameters_is_counted():
    from kubetune.trainer.api.estimate import estimate
    from kubetune.trainer.api.specfile import validate_training

    def trainable(**lora) -> int:
        spec = validate_training({"model": {"path": "builtin:tiny-mixtral"}, "data": {"datasets": [{"path": "x.json"}]},
                                  "lora": {"rank": 4, "targetModules": ["q_proj", "v_proj"], **lora}})
        return estimate(spec, gpus_per_node=0).trainable

    attention_only = trainable()
    assert attention_only == 2 * 2 * 4 * (128 + 128)  # 2 layers x (q, v) x r x (in + out)
    # + per layer, 4 experts x r x ((128 + 2 x 128) gate/up + (128 + 128) down)
    with_experts = trainable(targetParameters=["experts.gate_up_proj", "experts.down_proj"])
    assert with_experts == attention_only + 2 * 4 * 4 * (2 * (128 + 128) + (128 + 128))
