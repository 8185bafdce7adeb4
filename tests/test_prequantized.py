"""Pre-quantized checkpoints: LoRA on a real AQLM checkpoint on the CPU (aqlm's dequantizing
kernels), built here from the tiny Llama; GPTQ/AWQ checkpoints, whose kernels need a GPU, are
refused on a CPU with one paragraph naming the field and the fix; methods that would train the
quantized codes are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.models.prequantized import check_prequantized
from kubetune.trainer.train.runner import run

from .conftest import REPO
from .test_train import read_metrics, small_spec


def kmeans(vectors: torch.Tensor, k: int, iterations: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    centres = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(vectors, centres).argmin(1)
        for j in range(k):
            if (nearest == j).any():
                centres[j] = vectors[nearest == j].mean(0)
    return centres, torch.cdist(vectors, centres).argmin(1)


def aqlm_linear(linear: torch.nn.Linear, bits: int = 7, group: int = 2):
    """AQLM's format (one codebook of 2^bits vectors of `group` weights, a scale per output row),
    filled by k-means: a small additive quantization of the layer (3.5 bits per weight)."""
    from aqlm import QuantizedLinear

    layer = QuantizedLinear(linear.in_features, linear.out_features, in_group_size=group, out_group_size=1,
                            num_codebooks=1, nbits_per_codebook=bits, bias=linear.bias is not None)
    weight = linear.weight.data
    scale = weight.norm(dim=1, keepdim=True) / weight.shape[1] ** 0.5
    codebook, codes = kmeans((weight / scale).reshape(-1, group), 2**bits)
    layer.codebooks.data = codebook.reshape(1, 2**bits, 1, group).to(layer.codebooks.dtype)
    layer.codes.data = codes.reshape(weight.shape[0], weight.shape[1] // group, 1).to(layer.codes.dtype)
    layer.scales.data = scale.reshape(-1, 1, 1, 1).to(layer.scales.dtype)
    return layer


@pytest.fixture(scope="module")
def aqlm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama, AQLM-quantized (every linear layer but the output head) and saved as a
    checkpoint whose config.json carries `quantization_config` (quant_method: aqlm)."""
    pytest.importorskip("aqlm")
    import transformers.quantizers  # noqa: F401  (imports transformers' AQLM integration in order)
    from transformers import AqlmConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            model.set_submodule(name, aqlm_linear(module))
    model.config.quantization_config = AqlmConfig(in_group_size=2, out_group_size=1, num_codebooks=1, nbits_per_codebook=7,
                                                  linear_weights_not_to_quantize=["lm_head"])
    out = tmp_path_factory.mktemp("tiny-aqlm")
    model.save_pretrained(out)
    for source in tiny_model_dir.iterdir():  # the tokenizer and its chat template
        if not (out / source.name).exists():
            shutil.copy(source, out / source.name)
    return out


@pytest.mark.slow
def test_lora_trains_on_an_aqlm_checkpoint_on_the_cpu(tmp_path, aqlm_model_dir):
    spec = validate_training(small_spec(tmp_path, model={"path": str(aqlm_model_dir)}, method="lora",
                                        lora={"rank": 8}, train={"maxSteps": 8, "batchSize": 8, "learningRate": 1e-2},
                                        checkpoint={"everySteps": 8}, logging={"everySteps": 1, "samples": 0}))
    result = run(spec)
    evals = [r["eval_loss"] for r in read_metrics(result.output_dir) if "eval_loss" in r]
    assert evals[-1] < 0.9 * evals[0], evals
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    # `all-linear` found the AQLM layers (PEFT's own all-linear sees nn.Linear only): every projection adapted
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{projection}.lora_A" in name for name in adapter), (projection, sorted(adapter))
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).name == aqlm_model_dir.name


def fake_checkpoint(tiny_model_dir: Path, target: Path, method: str) -> Path:
    """The tiny Llama's files with a GPTQ/AWQ `quantization_config` in config.json: enough for the
    checks, which run before any weight is loaded."""
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_checkpoints_are_refused_on_a_cpu_before_loading(tmp_path, tiny_model_dir, method):
    from kubetune.trainer.train.models.loader import load_model

    checkpoint = fake_checkpoint(tiny_model_dir, tmp_path / method, method)
    spec = validate_training(small_spec(tmp_path, model={"path": str(checkpoint)}, method="lora"))
    with pytest.raises(SpecError, match=rf"^model\.path: .*quantization_config\.quant_method: {method}\).*need a CUDA GPU.*Fix: .*method: qlora"):
        load_model(spec, "fp32")


@pytest.mark.slow  # through `kubetune train`, in a subprocess
def test_the_refusal_is_one_paragraph_and_exit_2(tmp_path, tiny_model_dir):
    method = "gptq"
    checkpoint = fake_checkpoint(tiny_model_dir, tmp_path / method, method)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(small_spec(tmp_path, model={"path": str(checkpoint)}, method="lora")))
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("model.path:") or "model.path:" in message, proc.stderr[-1500:]
    assert f"quantization_config.quant_method: {method}" in message and "need a CUDA GPU" in message
    assert "Fix:" in message and "method: qlora" in message


def test_methods_that_would_train_the_codes_and_missing_kernels_are_refused(tmp_path, monkeypatch):
    config = type("Config", (), {"quantization_config": {"quant_method": "aqlm"}})()
    spec = validate_training(small_spec(tmp_path, method="full"))
    with pytest.raises(SpecError, match=r"^method: .*already AQLM-quantized.*only LoRA"):
        check_prequantized(spec, config, "ckpt")
    lora = validate_training(small_spec(tmp_path, method="lora"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(SpecError, match=r"^model\.path: .*needs aqlm.*Fix: pip install"):
        check_prequantized(lora, config, "ckpt")
    unquantized = type("Config", (), {})()
    assert check_prequantized(lora, unquantized, "ckpt") is None
