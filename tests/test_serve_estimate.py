"""The serving memory check: one InferenceService replica's weights, activation peak and KV cache
(`kubetune estimate isvc.yaml`, the admission webhook, the serving reconciler). A model that
cannot start is refused before any pod is scheduled, saying which tensorParallelSize or
maxModelLen would start; vision towers and every expert of a mixture of experts count."""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import replace
from typing import Any

import pytest
import yaml

from kubetune.operator.serving.decide import ServingObserved, reconcile_service
from kubetune.operator.serving.render import ServingOptions
from kubetune.operator.status import INSUFFICIENT_GPU_MEMORY
from kubetune.operator.validation import (
    GPU_MEMORY_ENV,
    AdmissionRefused,
    admit,
    memory_refusal,
    validate_resource,
)
from kubetune.trainer.api.estimate import GIB, KNOWN_SHAPES, shape_for_path
from kubetune.trainer.api.serve_estimate import extra_args_settings, kv_bytes_per_token, serving_estimate
from kubetune.trainer.cli.main import main

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(autouse=True)
def _no_operator_default(monkeypatch):
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)


def isvc(uri: str | None = "s3://models/Llama-3.1-8B-Instruct", **spec: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"uri": uri} if uri else {"fromJob": {"fineTuneJob": "chat-sft"}}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"model": model, "gpus": 1, "gpuMemoryGiB": 24, **spec}}


# -- the arithmetic ---------------------------------------------------------------------------

def test_kv_bytes_per_token_is_vllms_page_size_per_token():
    """2 (K and V) x layers x KV heads x head dim x 2 bytes: Llama-3.1-8B holds 128 KiB per
    token (8 KV heads of 128 over 32 layers), Llama-2-7B 512 KiB (32 heads); tensor parallelism
    splits the heads, and never below one head per GPU."""
    llama3, llama2 = KNOWN_SHAPES["llama-3.1-8b"], KNOWN_SHAPES["llama-2-7b"]
    assert kv_bytes_per_token(llama3) == 128 * 1024
    assert kv_bytes_per_token(llama2) == 512 * 1024
    assert kv_bytes_per_token(llama3, 2) == 64 * 1024
    assert kv_bytes_per_token(llama3, 16) == kv_bytes_per_token(llama3, 8) == 16 * 1024
    assert kv_bytes_per_token(llama3, dtype="float32") == 256 * 1024


def test_llama_31_8b_at_its_full_context_does_not_start_on_24_gib_but_does_on_80():
    """vLLM's own start-up failure: the 131,072-token default context needs 16 GiB of KV cache
    for one sequence beside 15 GiB of weights; a 24 GiB GPU has room for ~37k tokens."""
    shape = KNOWN_SHAPES["llama-3.1-8b"]
    small = serving_estimate(shape, gpu_gib=24)
    assert small is not None and not small.fits
    assert small.max_model_len == 131072
    assert 14.5 < small.components["weights"] / GIB < 15.5
    assert 25_000 < small.kv_tokens < 45_000
    big = serving_estimate(shape, gpu_gib=80)
    assert big is not None and big.fits and big.kv_tokens > 131072 * 3
    assert serving_estimate(shape, gpu_gib=24, max_model_len=8192).fits


def test_weights_divide_over_tensor_parallel_ranks_and_quantization_shrinks_them():
    shape = KNOWN_SHAPES["llama-2-70b"]
    one = serving_estimate(shape, gpu_gib=80)
    two = serving_estimate(shape, gpu_gib=80, tensor_parallel=2)
    awq = serving_estimate(shape, gpu_gib=80, quantization="awq")
    assert one is not None and two is not None and awq is not None
    assert one.kv_space < 0 and not one.fits  # 128 GiB of weights on one 80 GiB GPU
    assert two.components["weights"] == pytest.approx(one.components["weights"] / 2)
    assert two.fits
    assert one.components["weights"] / awq.components["weights"] == pytest.approx(16 / 4.25)
    assert awq.fits
    assert serving_estimate(shape, gpu_gib=80, quantization="some-new-method") is None  # not guessed


def test_a_mixture_of_experts_holds_every_expert():
    """Mixtral-8x7B: 46.7B parameters held (87 GiB in 16-bit), 12.9B active per token."""
    shape = KNOWN_SHAPES["mixtral-8x7b"]
    est = serving_estimate(shape, gpu_gib=80)
    assert est is not None and not est.fits
    assert 85 < est.components["weights"] / GIB < 89
    assert any("12.9B are active per token" in note and "46.7B" in note for note in est.notes)
    assert serving_estimate(shape, gpu_gib=80, tensor_parallel=2).fits


def test_a_vision_language_model_holds_its_vision_tower():
    """A LLaVA-1.5-7B config (CLIP ViT-L/14-336 + Llama-2-7B): the tower and projector's 0.3B
    parameters are in the weights, and said so."""
    config = {"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 4096,
              "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32064, "intermediate_size": 11008,
              "max_position_embeddings": 4096},
              "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096,
                                "image_size": 336, "patch_size": 14}}
    with_tower = shape_for_path("llava", config=config)
    text_only = replace(with_tower, vision_hidden=0)
    est, text = serving_estimate(with_tower, gpu_gib=24), serving_estimate(text_only, gpu_gib=24)
    assert est is not None and text is not None
    tower = (est.components["weights"] - text.components["weights"]) / 2
    assert 0.28e9 < tower < 0.33e9
    assert any(note.startswith("vision encoder") for note in est.notes)


def test_a_bare_parameter_count_checks_the_weights_only():
    """modelParameters alone gives a Llama-like layout whose KV heads are a guess: a refusal on
    that guess could refuse a model that starts, so only the weights are checked."""
    shape = shape_for_path("s3://private/model", "8B")
    est = serving_estimate(shape, gpu_gib=24, max_model_len=131072)
    assert est is not None and est.max_model_len == 0 and est.fits
    assert not serving_estimate(shape_for_path("s3://private/model", "70B"), gpu_gib=80).fits


# -- the operator: admission and reconcile ----------------------------------------------------

def test_admission_refuses_a_model_that_cannot_start_and_admits_what_it_suggests():
    cr = isvc()
    with pytest.raises(AdmissionRefused) as refused:
        admit("CREATE", None, cr)
    message = str(refused.value)
    assert "InferenceService ml/chat" in message and "spec.gpuMemoryGiB" in message
    assert "maxModelLen 131,072" in message and "llama-3.1-8b" in message
    assert "tensorParallelSize: 2 and gpus: 2" in message
    suggested = int(message.split("engineArgs.maxModelLen: ")[1].split()[0])
    assert 25_000 < suggested < 45_000
    fixed = isvc(engineArgs={"maxModelLen": suggested})
    assert admit("CREATE", None, fixed) == []
    assert admit("CREATE", None, isvc(gpus=2)) == []  # tensorParallelSize defaults to gpus


def test_vllm_flags_in_extra_args_that_change_memory_are_read_as_vllm_reads_them():
    """The four memory-changing vLLM flags, in every spelling a manifest may use; other flags and
    values vLLM itself would refuse change nothing here; the last occurrence wins."""
    assert extra_args_settings(["--kv-cache-dtype", "fp8", "--enable-prefix-caching", "--max-num-seqs=64"]) == {
        "kv_cache_dtype": "fp8", "max_seqs": 64}
    assert extra_args_settings(["--max-num-batched-tokens 2048", "--cpu_offload_gb=4.5", "--max-num-seqs", "x"]) == {
        "batched_tokens": 2048, "cpu_offload_gib": 4.5}
    assert extra_args_settings(["--kv-cache-dtype=fp8_e5m2", "--kv-cache-dtype=auto"]) == {"kv_cache_dtype": "auto"}
    assert extra_args_settings(None) == extra_args_settings(["--kv-cache-dtype"]) == {}


def test_an_fp8_kv_cache_and_cpu_offload_in_extra_args_change_what_starts():
    """Llama-3.1-8B on 24 GiB: an fp8 KV cache halves the bytes per token (twice the tokens, and
    the suggested maxModelLen doubles with it, as the suggestions keep the estimate's settings);
    offloading 8 GiB of weights to the host leaves room for its full 131,072-token context."""
    shape = KNOWN_SHAPES["llama-3.1-8b"]
    plain = serving_estimate(shape, gpu_gib=24)
    fp8 = serving_estimate(shape, gpu_gib=24, **extra_args_settings(["--kv-cache-dtype", "fp8"]))
    assert plain is not None and fp8 is not None
    assert fp8.kv_bytes_per_token == 64 * 1024 and fp8.kv_tokens == pytest.approx(2 * plain.kv_tokens, rel=1e-3)
    assert "counted from engineArgs.extraArgs: --kv-cache-dtype fp8" in fp8.notes
    smaller_batch = serving_estimate(shape, gpu_gib=24, batched_tokens=2048)
    assert smaller_batch.components["activations"] < plain.components["activations"] / 2

    def suggested(cr: dict) -> int:
        with pytest.raises(AdmissionRefused) as refused:
            admit("CREATE", None, cr)
        return int(str(refused.value).split("engineArgs.maxModelLen: ")[1].split()[0])

    assert suggested(isvc(engineArgs={"extraArgs": ["--kv-cache-dtype", "fp8"]})) > 1.9 * suggested(isvc())
    offloaded = isvc(engineArgs={"extraArgs": ["--kv-cache-dtype=fp8", "--cpu-offload-gb", "8"]})
    assert admit("CREATE", None, offloaded) == []


def test_the_transformers_engine_is_sized_on_one_gpu():
    cr = isvc(uri="s3://models/Llama-2-70b-hf", engine="transformers", gpus=2, gpuMemoryGiB=80)
    refusal = memory_refusal(validate_resource(cr), cr)
    assert refusal and "engine transformers" in refusal and "tensorParallelSize:" not in refusal


def test_what_cannot_be_sized_is_a_warning_not_a_refusal():
    unknown = isvc(uri="s3://private/my-model")
    assert any("spec.modelParameters" in w for w in admit("CREATE", None, unknown))
    quantized = isvc(uri="s3://models/Llama-2-70b-AWQ")
    assert any("engineArgs.quantization" in w for w in admit("CREATE", None, quantized))
    with pytest.raises(AdmissionRefused, match="tensorParallelSize"):
        admit("CREATE", None, isvc(uri="s3://private/my-model", modelParameters="70B", gpuMemoryGiB=80))
    assert admit("CREATE", None, isvc(gpus=0)) == []  # CPU serving: no GPU to check


def test_the_operator_default_applies_without_gpu_memory_in_the_spec(monkeypatch):
    cr = isvc()
    del cr["spec"]["gpuMemoryGiB"]
    assert admit("CREATE", None, cr) == []
    with pytest.raises(AdmissionRefused, match="--gpu-memory-gib"):
        admit("CREATE", None, cr, default_gib=24)
    monkeypatch.setenv(GPU_MEMORY_ENV, "24")  # what `kubetune validate` applies
    with pytest.raises(AdmissionRefused):
        admit("CREATE", None, cr)


def _trained(path: str, phase: str = "Succeeded") -> dict[str, Any]:
    return {"kind": "FineTuneJob", "metadata": {"name": "chat-sft"},
            "spec": {"training": {"model": {"path": path}, "output": {"path": "s3://out/chat-sft"}}},
            "status": {"phase": phase}}


def test_the_reconciler_sizes_a_model_from_its_job_and_fails_before_creating_anything():
    """The webhook cannot see the job a model comes from; the reconciler can: a 70B base on
    one 80 GiB GPU ends Failed/InsufficientGPUMemory with no Deployment."""
    cr = isvc(uri=None, gpuMemoryGiB=80)
    observed = ServingObserved(secret_found=None, references={"FineTuneJob/chat-sft": _trained("meta-llama/Llama-2-70b-hf")})
    plan = reconcile_service(cr, observed, T0, ServingOptions())
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == INSUFFICIENT_GPU_MEMORY
    assert "tensorParallelSize: 2 and gpus: 2" in plan.status["message"]
    assert not plan.create and not plan.patch and [e.reason for e in plan.events] == [INSUFFICIENT_GPU_MEMORY]
    small = ServingObserved(secret_found=None, references={"FineTuneJob/chat-sft": _trained("meta-llama/Llama-2-7b-hf")})
    plan = reconcile_service(cr, small, T0, ServingOptions())
    assert plan.status["phase"] != "Failed" and "Deployment" in [o["kind"] for o in plan.create]


def test_the_operator_default_reaches_the_reconciler_and_a_serving_version_keeps_serving():
    cr = isvc()
    del cr["spec"]["gpuMemoryGiB"]
    plan = reconcile_service(cr, ServingObserved(secret_found=None), T0, ServingOptions(gpu_memory_gib=24))
    assert plan.status["reason"] == INSUFFICIENT_GPU_MEMORY
    serving = reconcile_service(cr, ServingObserved(secret_found=None), T0, ServingOptions(gpu_memory_gib=80))
    deployment = next(obj for obj in serving.create if obj["kind"] == "Deployment")
    deployment["status"] = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}
    kept = reconcile_service({**cr, "status": serving.status}, ServingObserved(secret_found=None, deployment=deployment),
                             T0, ServingOptions(gpu_memory_gib=24))
    assert kept.status["phase"] != "Failed" and not kept.create and not kept.patch
    assert any(e.reason == INSUFFICIENT_GPU_MEMORY and "keeps serving" in e.message for e in kept.events)


# -- kubetune estimate ------------------------------------------------------------------------

def test_kubetune_estimate_prints_a_services_breakdown(tmp_path, capsys):
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(isvc()))
    assert main(["estimate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "kv cache" in out and "fits: NO" in out and "maxModelLen 131,072" in out
    cr = isvc(engineArgs={"maxModelLen": 16384})
    path.write_text(yaml.safe_dump(cr))
    assert main(["estimate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["kvBytesPerToken"] == 128 * 1024 and report["maxModelLen"] == 16384
    assert main(["estimate", str(path), "--gpu-memory", "16"]) == 1
    path.write_text(yaml.safe_dump(isvc(engineArgs={"extraArgs": ["--kv-cache-dtype", "fp8", "--cpu-offload-gb", "8"]})))
    assert main(["estimate", str(path)]) == 0
    assert "counted from engineArgs.extraArgs: --kv-cache-dtype fp8, --cpu-offload-gb 8.0" in capsys.readouterr().out


def test_kubetune_estimate_of_a_model_from_a_job_asks_for_its_size(tmp_path, capsys):
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(isvc(uri=None)))
    assert main(["estimate", str(path)]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["estimate", str(path), "--params", "8B"]) == 0


def test_the_example_service_is_sized_and_admitted(tmp_path, capsys):
    """examples/inferenceservice.yaml names its GPU memory and (its model comes from a job) the
    model's size: admitted, and `kubetune estimate` on it says it fits."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "inferenceservice.yaml"
    doc = yaml.safe_load(example.read_text())
    assert admit("CREATE", None, copy.deepcopy(doc)) == []
    assert main(["estimate", str(example)]) == 0
    assert "fits: yes" in capsys.readouterr().out
    doc["spec"]["modelParameters"] = "70B"
    with pytest.raises(AdmissionRefused, match="tensorParallelSize: 2 and gpus: 2"):
        admit("CREATE", None, doc)


def test_kubetune_estimate_names_a_field_that_is_not_a_number(tmp_path, capsys):
    path = tmp_path / "isvc.yaml"
    path.write_text(yaml.safe_dump(isvc(gpus="many")))
    assert main(["estimate", str(path)]) == 2
    assert "spec.gpus: 'many' is not a number" in capsys.readouterr().err
