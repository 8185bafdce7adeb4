"""Model customisation: RoPE scaling, vocabulary extension, adapter export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.cli.main import main
from kubetune.trainer.train.models.vocab import resize_embeddings
from kubetune.trainer.train.runner import run

from .test_methods import assert_learns, train_spec

pytestmark = pytest.mark.slow


def test_rope_scaling_factor_defaults_to_the_length_ratio_and_is_saved(tmp_path):
    # The tiny model's context is 256 tokens; train on 1024-token sequences (4x).
    spec = train_spec(tmp_path, "full", steps=2, lr=1e-3)
    doc = spec.to_document()
    doc["model"]["ropeScaling"] = {"type": "linear"}
    doc["data"]["maxLength"] = 1024
    doc["data"]["packing"] = True  # full 1024-token rows: the model must run on sequences that long
    doc["stage"] = "pt"
    doc["data"]["datasets"][0] = {"path": doc["data"]["datasets"][0]["path"].replace("demo_alpaca.json", "demo_text.jsonl"), "format": "text"}
    doc["train"]["batchSize"] = 1
    result = run(validate_training(doc))
    config = AutoConfig.from_pretrained(result.output_dir)
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
    assert config.max_position_embeddings == 1024
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    with torch.no_grad():
        logits = model(torch.randint(0, 100, (1, 1024))).logits
    assert logits.shape[1] == 1024 and torch.isfinite(logits).all()


def rope_spec(tmp_path, max_length: int, scaling: dict | None):
    doc = train_spec(tmp_path, "full", steps=1).to_document()
    doc["model"]["ropeScaling"] = scaling
    doc["data"]["maxLength"] = max_length
    return validate_training(doc)


def test_dynamic_rope_scaling_changes_logits_beyond_the_original_window(tmp_path):
    """#17 item 8: dynamic NTK used to be written with a raised max_position_embeddings, which is
    the window transformers scales beyond, so every position up to it ran unscaled RoPE."""
    from kubetune.trainer.train.models.loader import load_model
    from kubetune.trainer.train.models.rope import context_length

    plain = load_model(rope_spec(tmp_path, 256, None), "fp32").eval()
    scaled = load_model(rope_spec(tmp_path, 1024, {"type": "dynamic"}), "fp32").eval()
    long_ids = torch.randint(0, 100, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inside = [m(long_ids[:, :200]).logits for m in (plain, scaled)]
        beyond = [m(long_ids).logits[:, 256:] for m in (plain, scaled)]
    torch.testing.assert_close(inside[1], inside[0])  # within the original window: plain RoPE
    assert (beyond[1] - beyond[0]).abs().max() > 1e-2  # past it: the NTK-scaled frequencies
    assert context_length(scaled.config) == 1024 and scaled.config.max_position_embeddings == 256  # serve's window
    scaled.save_pretrained(tmp_path / "saved")  # what serve and later stages load
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(long_ids).logits[:, 256:], beyond[1])


@pytest.mark.parametrize(("max_length", "scaling", "warns"), [
    (1024, None, True), (256, None, False), (1024, {"type": "linear"}, False), (1024, {"type": "dynamic", "factor": 2}, True),
])
def test_max_length_beyond_the_context_warns(tmp_path, caplog, max_length, scaling, warns):
    from kubetune.trainer.train.models.loader import load_model

    with caplog.at_level("WARNING", logger="kubetune.trainer.train.models.rope"):
        load_model(rope_spec(tmp_path, max_length, scaling), "fp32")
    messages = [r.getMessage() for r in caplog.records if "data.maxLength" in r.getMessage()]
    assert bool(messages) == warns, messages
    if warns:
        assert f"data.maxLength {max_length} is beyond the model's context" in messages[0] and "model.ropeScaling" in messages[0]


def test_vocabulary_extension_adds_single_tokens_initialised_at_the_mean(tmp_path, tiny_model_dir):
    words = ["kubetuneword", "zeroshotish", "gpuhour"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert all(len(tokenizer.tokenize(w)) > 1 for w in words)

    # The initialisation: new rows equal the old mean up to the (small) noise.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, old.shape[0] + len(words), noise_std=0.01, seed=0)
    new = model.get_input_embeddings().weight.detach()
    assert torch.equal(new[: old.shape[0]], old)
    deviation = (new[old.shape[0]:] - old.mean(0)).abs().max()
    assert deviation < 0.05 * old.std(0).max(), deviation

    # End to end: the extended model trains (LoRA, so embeddings and head become trainable) and saves.
    spec = train_spec(tmp_path, "lora", steps=12, lora={"rank": 4})
    spec = validate_training({**spec.to_document(), "vocab": {"addTokens": words, "noiseStd": 0.01}})
    result = run(spec)
    saved = AutoTokenizer.from_pretrained(result.output_dir)
    for word in words:
        ids = saved.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= len(tokenizer), (word, ids)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    assert_learns(result.output_dir)


def test_export_merged_logits_equal_adapter_logits(tmp_path, tiny_model_dir):
    from peft import PeftModel

    result = run(train_spec(tmp_path, "lora", steps=8, lora={"rank": 4}))
    merged_dir = tmp_path / "merged"
    assert main(["export", str(result.output_dir), "--out", str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()

    inputs = torch.randint(0, 500, (2, 24))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, actual = with_adapter(inputs).logits, merged(inputs).logits
    assert torch.allclose(expected, actual, atol=1e-4), (expected - actual).abs().max()


def test_export_rejects_a_directory_without_an_adapter(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_vocabulary_from_a_trained_corpus_adds_domain_words(tmp_path, tiny_model_dir):
    from kubetune.trainer.train.models.vocab import extend_tokenizer

    corpus = tmp_path / "domain.txt"
    words = ["kubernetesoperator", "finetunejob", "inferenceservice"]
    corpus.write_text("\n".join(f"the {w} reconciles the {w} again and again" for w in words * 30))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = len(tokenizer)
    spec = validate_training({"model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": "x.jsonl"}]},
                              "vocab": {"trainCorpus": [str(corpus)], "trainVocabSize": 400}})
    added = extend_tokenizer(spec, tokenizer)
    assert set(words) <= set(added), added
    assert len(tokenizer) == before + len(added)
    for word in words:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1
