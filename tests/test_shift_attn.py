"""LongLoRA's S²-Attn (`model.shiftAttention`): full attention outside training, grouped and
shifted attention in training that equals full attention under the S² mask, no attention across
the examples of a padding-free batch, and a run whose loss falls."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kubetune.trainer.api.errors import SpecError, SpecErrors
from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.models.shift_attn import apply_shift_attention, group_size, s2_attention
from kubetune.trainer.train.runner import run

from .test_train import read_metrics, small_spec


def tiny_llama(implementation: str = "sdpa", heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return LlamaForCausalLM._from_config(config, attn_implementation=implementation)


def patched_copy(model: LlamaForCausalLM, max_length: int) -> LlamaForCausalLM:
    twin = LlamaForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation=model.config._attn_implementation)
    twin.load_state_dict(model.state_dict())
    apply_shift_attention(twin, max_length)
    return twin


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_outside_training_the_patched_model_is_the_unpatched_one(implementation):
    base = tiny_llama(implementation)
    patched = patched_copy(base, max_length=32)
    assert patched.config._attn_implementation == f"kubetune_s2_{implementation}"
    ids = torch.randint(0, 64, (2, 40))
    base.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, patched(ids).logits)
        generated = base.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, patched.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))
    # In training the same weights attend differently (groups of 8 over 40 tokens): the patch is live.
    base.train(), patched.train()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, patched(ids).logits, atol=1e-3)


def s2_reference_mask(length: int, group: int, heads: int, causal: torch.Tensor) -> torch.Tensor:
    """[heads, length, length]: who may attend whom under S²-Attn, written out position by position
    (first half of the heads: same group; second half: same group after shifting by half a group,
    over the row padded to whole groups), and by the model's own mask."""
    total = -(-length // group) * group
    pos = torch.arange(length)
    plain = (pos[:, None] // group) == (pos[None, :] // group)
    moved = (pos - group // 2) % total // group
    shifted = moved[:, None] == moved[None, :]
    return torch.stack([plain] * (heads // 2) + [shifted] * (heads // 2)) & causal


@pytest.mark.parametrize("length", [24, 29])  # whole groups, and a row padded to whole groups
def test_grouped_attention_is_full_attention_under_the_s2_mask(length):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    heads, kv_heads, group = 4, 2, 8
    module = tiny_llama().model.layers[0].self_attn.train()
    q, k, v = torch.randn(2, heads, length, 16), torch.randn(2, kv_heads, length, 16), torch.randn(2, kv_heads, length, 16)
    # a padding-free row: two examples whose positions restart at 11 (block-diagonal causal mask)
    doc = (torch.arange(length) >= 11).long()
    causal = (torch.arange(length)[None, :] <= torch.arange(length)[:, None]) & (doc[:, None] == doc[None, :])
    for mask in (None, causal[None, None].expand(2, 1, -1, -1)):
        allowed = causal if mask is not None else torch.arange(length)[None, :] <= torch.arange(length)[:, None]
        got, _ = s2_attention(sdpa_attention_forward, module, q, k, v, mask, group=group, scaling=0.25, dropout=0.0)
        reference_mask = s2_reference_mask(length, group, heads, allowed)[None].expand(2, -1, -1, -1)
        want, _ = sdpa_attention_forward(module, q, k, v, reference_mask, scaling=0.25, dropout=0.0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_free_examples_do_not_attend_to_each_other():
    """Two examples in one padding-free row (positions restart): the second's outputs do not
    depend on the first's tokens, in training with S²-Attn on."""
    model = patched_copy(tiny_llama(), max_length=16).train()
    first, second = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 12))
    other_first = torch.randint(0, 64, (1, 12))
    positions = torch.cat([torch.arange(12), torch.arange(12)])[None]
    with torch.no_grad():
        a = model(torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits[:, 12:]
        b = model(torch.cat([other_first, second], 1), position_ids=positions, use_cache=False).logits[:, 12:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_models_it_cannot_patch_are_refused_naming_the_field():
    with pytest.raises(SpecError, match=r"model.shiftAttention.*even"):
        apply_shift_attention(tiny_llama(heads=2, kv_heads=1), 32)
    with pytest.raises(SpecError, match=r"model\.attnImplementation"):
        apply_shift_attention(tiny_llama("flex_attention"), 32)
    with pytest.raises(SpecErrors, match=r"shiftAttention.*flash_attention_2"):
        validate_training({"model": {"path": "builtin:tiny-llama", "shiftAttention": True,
                                     "attnImplementation": "flash_attention_2"}, "data": {"datasets": [{"path": "x.json"}]}})
    assert group_size(1024) == 256 and group_size(30) == 8


@pytest.mark.slow
def test_training_with_shift_attention_lowers_the_loss_and_saves_a_stock_model(tmp_path):
    spec = validate_training(small_spec(tmp_path, model={"path": "builtin:tiny-llama", "shiftAttention": True},
                                        data={"maxLength": 64}, train={"maxSteps": 12, "batchSize": 8, "learningRate": 2e-3},
                                        checkpoint={"everySteps": 12}, logging={"everySteps": 1, "samples": 0}))
    assert spec.padding_free_enabled  # the default batching, which S²-Attn works with
    result = run(spec)
    records = read_metrics(result.output_dir)
    start = next(r for r in records if r.get("event") == "start")
    assert start["kernels"]["attention"] == "kubetune_s2_sdpa" and start["batching"].startswith("padding-free")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < 0.8 * evals[0], evals
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "kubetune" not in json.dumps(config)  # nothing of the patch is saved
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert trained.config._attn_implementation == "sdpa"
