"""`kubetune estimate`: the memory model against a measured training run and published numbers.

- Measured: a real `kubetune` training run of a ~45M-parameter Llama (built here with LlamaConfig)
  in a subprocess on this CPU; the growth of its peak RSS (VmHWM, up to the first save) over the
  process's footprint right before the run (torch and every library already imported and
  exercised by a warm-up run on the tiny model) is what the model, gradients, optimizer states
  and activations take. The estimate for the same spec (gpusPerNode 0: a CPU process, fp32) must
  agree within 25%, both for a run dominated by model states (full fine-tuning: weights,
  gradients, AdamW) and one dominated by activations (LoRA, 8 x 256 tokens).
- Published: LlamaFactory's paper (Zheng et al. 2024, "LlamaFactory: Unified Efficient Fine-Tuning
  of 100+ Language Models", arXiv:2403.13372, Table 3: peak GPU memory of Llama2-7B on one A100,
  bf16, 8-bit AdamW, activation checkpointing, appendix D.1) and the rule-of-thumb table in
  LlamaFactory's README ("Hardware Requirement", 7B column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.estimate import (
    GIB,
    KNOWN_SHAPES,
    estimate,
    fit_message,
    parse_params,
    shape_for_params,
    shape_from_config,
)
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.artifacts.model_shape import resolve_shape
from kubetune.trainer.cli.estimate import register

from .conftest import EXAMPLES, REPO

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"


def training(**overrides) -> TrainingSpec:
    spec = {"model": {"path": LLAMA2_7B}, "data": {"datasets": [{"path": "data.jsonl"}], "maxLength": 512}}
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return TrainingSpec.model_validate(spec)


def within(estimated: float, published: float, tolerance: float = 0.25) -> bool:
    return abs(estimated - published) <= tolerance * published


# --------------------------------------------------------------------------------------------
# Model shapes


def test_parameter_counts_match_the_published_model_sizes():
    # Llama-2-7B has 6,738,415,616 parameters (its safetensors index); Llama-3-8B 8.03B;
    # Mistral-7B 7.24B; Qwen2.5-7B 7.62B; Llama-2-70B 68.98B.
    assert KNOWN_SHAPES["llama-2-7b"].parameters == 6_738_415_616
    for name, published in (("llama-3-8b", 8.03e9), ("mistral-7b", 7.24e9), ("qwen2.5-7b", 7.62e9),
                            ("llama-2-70b", 68.98e9), ("llama-3.2-1b", 1.24e9)):
        assert abs(KNOWN_SHAPES[name].parameters - published) / published < 0.01, name


def test_shapes_come_from_a_local_config_a_builtin_a_known_name_or_params(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    shape = resolve_shape(str(tmp_path / "m"))
    assert shape.parameters == sum(p.numel() for p in model.parameters())

    builtin = resolve_shape("builtin:tiny-llama")
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert abs(builtin.parameters - sum(p.numel() for p in real.parameters())) / builtin.parameters < 0.02

    assert resolve_shape("s3://models/base/Llama-2-7b-hf").name == "llama-2-7b"
    assert resolve_shape("s3://bucket/private-model") is None
    assert resolve_shape("s3://bucket/private-model", "13B").parameters == 13_000_000_000
    assert shape_for_params(parse_params("70B")).name.endswith("llama-2-70b-like)")
    assert resolve_shape(LLAMA2_7B, "7b").parameters == 7_000_000_000
    with pytest.raises(ValueError):
        parse_params("seven")
    tied = shape_from_config({"model_type": "gemma", "hidden_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "vocab_size": 10, "intermediate_size": 16})
    assert tied.tied_embeddings and tied.groups()["lm_head"] == 0


# --------------------------------------------------------------------------------------------
# Published numbers


# LlamaFactory paper, Table 3 (Llama2-7B, GB): Full-tuning 38.72, Freeze-tuning 15.69, GaLore 15.43,
# LoRA 16.32, QLoRA 7.52. Setup (appendix D.1): bf16, 8-bit AdamW, activation checkpointing, LoRA
# and QLoRA on all linear layers with rank 128 (alpha 256), GaLore rank 128, freeze-tuning of the
# last decoder layers, a token batch of 512, one A100 40GB. The full-tuning number fits on that
# GPU only as pure bf16 (LlamaFactory's pure_bf16: bf16 weights, no fp32 master), and GaLore's
# only without a full gradient buffer (galore_layerwise): the specs below say so.
PAPER = dict(train={"batchSize": 1, "precision": "bf16", "optimizer": "adamw_8bit", "gradientCheckpointing": True})
PURE_BF16 = {"path": LLAMA2_7B, "dtype": "bfloat16"}


@pytest.mark.parametrize(
    ("method", "extra", "published_gb"),
    [
        ("full", {"model": PURE_BF16}, 38.72),
        ("lora", {"lora": {"rank": 128, "alpha": 256}}, 16.32),
        ("qlora", {"lora": {"rank": 128, "alpha": 256}}, 7.52),
        ("freeze", {"model": PURE_BF16, "freeze": {"trainableLayers": 2}}, 15.69),
        ("galore", {"model": PURE_BF16, "galore": {"rank": 128, "layerwise": True}}, 15.43),
    ],
)
def test_llamafactory_paper_table3_llama2_7b(method, extra, published_gb):
    est = estimate(training(method=method, **PAPER, **extra), nodes=1, gpus_per_node=1)
    assert within(est.total_gib, published_gb), (method, est.summary(), published_gb)


# LlamaFactory README, "Hardware Requirement" (estimated GPU memory, 7B column): Full AMP 120GB,
# Full pure bf16 60GB, LoRA 16GB, QLoRA 4-bit 6GB (default LoRA settings, 1 x 512 tokens).
@pytest.mark.parametrize(
    ("method", "model", "published_gb"),
    [("full", {}, 120), ("full", {"dtype": "bfloat16"}, 60), ("lora", {}, 16), ("qlora", {}, 6)],
)
def test_llamafactory_readme_rule_of_thumb_7b(method, model, published_gb):
    spec = training(method=method, model={"path": LLAMA2_7B, **model},
                    train={"batchSize": 1, "precision": "bf16", "gradientCheckpointing": True})
    est = estimate(spec, nodes=1, gpus_per_node=1)
    assert within(est.total_gib, published_gb), (method, model, est.summary(), published_gb)


def test_zero_stages_partition_what_the_zero_paper_says():
    """ZeRO paper (arXiv:1910.02054) figure 1: 7.5B params, 64 GPUs, K=12: baseline 120 GB,
    stage 1 31.4 GB, stage 2 16.6 GB, stage 3 1.9 GB of model states per GPU."""
    shape = shape_for_params(7_500_000_000)
    published = {None: 120, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in published.items():
        ds = {"deepspeed": {"stage": stage}} if stage is not None else {}
        spec = training(method="full", distributed=ds, train={"precision": "bf16"})
        if stage is None:  # plain mixed precision, ZeRO's accounting (2 + 2 + 12 bytes)
            spec = training(method="full", distributed={"deepspeed": {"stage": 0}}, train={"precision": "bf16"})
        est = estimate(spec, nodes=8, gpus_per_node=8, shape=shape)
        states = (est.components["weights"] + est.components["gradients"] + est.components["optimizer"]) / 1e9
        states -= est.working_set_bytes / 1e9  # ZeRO-3's gathered layers, on top of the paper's states
        assert within(states, gb, 0.1), (stage, states, gb)


def test_more_ranks_help_only_with_zero_and_offload_moves_states_to_cpu():
    spec = training(method="full", train={"precision": "bf16"})
    single = estimate(spec, nodes=1, gpus_per_node=1)
    ddp = estimate(spec, nodes=4, gpus_per_node=8)
    assert ddp.total >= single.total  # DDP: a full replica per GPU (and gradient buckets that persist)
    assert "overlap" in single.components and "overlap" not in ddp.components
    zero3 = training(method="full", train={"precision": "bf16"}, distributed={"deepspeed": {"stage": 3}})
    assert estimate(zero3, nodes=4, gpus_per_node=8).total_gib < single.total_gib / 4
    offload = training(method="full", train={"precision": "bf16"},
                       distributed={"deepspeed": {"stage": 3, "offloadOptimizer": True}})
    est = estimate(offload, nodes=1, gpus_per_node=8)
    assert est.components["optimizer"] == 0 and est.cpu_offload_bytes > 0
    ckpt = training(method="full", train={"precision": "bf16", "gradientCheckpointing": True, "batchSize": 8})
    plain = training(method="full", train={"precision": "bf16", "batchSize": 8})
    assert estimate(ckpt).gib("activations") < estimate(plain).gib("activations") / 4


def test_fit_message_names_what_would_fit():
    spec = training(method="full", train={"batchSize": 4, "precision": "bf16"})
    message = fit_message(spec, nodes=1, gpus_per_node=8, gpu_gib=80, shape=KNOWN_SHAPES["llama-2-7b"])
    assert "needs ~" in message and "80 GiB" in message
    assert "distributed.deepspeed.stage: 3" in message and "method: qlora" in message
    # one GPU: ZeRO cannot partition, more nodes can
    message = fit_message(spec, nodes=1, gpus_per_node=1, gpu_gib=80, shape=KNOWN_SHAPES["llama-2-7b"])
    assert "nodes: 2 with distributed.deepspeed.stage: 3" in message, message


# --------------------------------------------------------------------------------------------
# The CLI


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="kubetune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["estimate", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_cli_prints_a_table_and_the_verdict(tmp_path, capsys):
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "big"},
        "spec": {"nodes": 2, "gpusPerNode": 8, "gpuMemoryGiB": 80, "modelParameters": "7B",
                 "training": {"model": {"path": "s3://models/private"}, "method": "full",
                              "data": {"datasets": [{"path": "s3://data/x.jsonl"}]}}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, out = run_cli(str(path), capsys=capsys)
    assert code == 1, out
    for word in ("weights", "gradients", "optimizer", "activations", "total per GPU", "fits: NO",
                 "2 node(s) x 8 GPU(s)", "distributed.deepspeed.stage: 3"):
        assert word in out, (word, out)
    code, out = run_cli(str(path), "--set", "method=qlora", "--set", "train.gradientCheckpointing=true", capsys=capsys)
    assert code == 0 and "fits: yes" in out, out
    code, out = run_cli(str(path), "--json", "--gpu-memory", "40", "--set", "method=lora", capsys=capsys)
    report = json.loads(out)
    assert report["nodes"] == 2 and report["gpusPerNode"] == 8 and report["parameters"] == 7_000_000_000
    assert set(report["componentsGiB"]) >= {"weights", "gradients", "optimizer", "activations"}
    assert report["fits"] is (code == 0)


def test_cli_asks_for_params_when_the_model_size_is_unknown(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "s3://models/private"}, "data": {"datasets": [{"path": "d.jsonl"}]}}))
    with pytest.raises(SpecError, match="--params"):
        run_cli(str(path), capsys=capsys)
    code, out = run_cli(str(path), "--params", "1.5B", "--gpu-memory", "24", capsys=capsys)
    assert "1.5B parameters" in out and code == 0 and "fits: yes" in out, out


# --------------------------------------------------------------------------------------------
# Measured: peak RSS of a real training run on this CPU

PROBE = textwrap.dedent(
    """
    import gc, json, os, sys
    from pathlib import Path

    import transformers
    from kubetune.trainer.train.runner import run
    from kubetune.trainer.cli.specfiles import load_spec

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    class Trained(Exception):
        pass

    peak = {}

    def record_and_stop(self, *args, **kwargs):
        peak["bytes"] = hwm()  # the peak of the training steps, before anything is saved
        raise Trained

    transformers.Trainer.save_model = record_and_stop
    transformers.Trainer._save_checkpoint = record_and_stop

    warmup, *measured = sys.argv[1:]
    results = {}
    for name, path in [("warmup", warmup), *(p.split("=", 1) for p in measured)]:
        gc.collect()
        base = rss()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        try:
            run(load_spec(path).spec)
        except Trained:
            pass
        results[name] = {"base": base, "peak": peak.pop("bytes")}
    print("PROBE " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A 6-layer Llama with ~45M parameters and the tiny model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("mid-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def probe_spec(model: str, out: Path, method: str, batch: int) -> dict:
    return {
        "name": "probe",
        "stage": "pt",  # packed: every sequence is exactly maxLength tokens, as the estimate assumes
        "model": {"path": model},
        "data": {"datasets": [{"path": str(EXAMPLES / "data" / "demo_text.jsonl"), "format": "text"}],
                 "maxLength": 256, "packing": True},
        "method": method,
        "train": {"maxSteps": 2, "batchSize": batch, "precision": "fp32", "learningRate": 1e-4},
        "checkpoint": {"everySteps": 1000},
        "logging": {"everySteps": 1, "samples": 0},
        "output": {"path": str(out)},
    }


MEASURED = {"full-states": ("full", 2), "lora-activations": ("lora", 6)}
"""Full fine-tuning (weights + gradients + AdamW dominate) and LoRA with 6 x 256 tokens per step
(activations dominate)."""


@pytest.fixture(scope="module")
def measured_runs(tmp_path_factory, mid_model) -> dict[str, tuple[float, float]]:
    """{name: (measured peak RSS growth, estimate)} in bytes, from one probe process."""
    tmp = tmp_path_factory.mktemp("probe")
    specs = {"warmup": probe_spec("builtin:tiny-llama", tmp / "warmup", "lora", 2)}
    specs.update({name: probe_spec(str(mid_model), tmp / name, *args) for name, args in MEASURED.items()})
    paths = {}
    for name, body in specs.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(body))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(paths["warmup"]), *(f"{n}={paths[n]}" for n in MEASURED)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        # glibc returns every freed block of >= 1 MiB to the OS at once, so RSS follows the live
        # tensors (the CPU analogue of torch.cuda.max_memory_allocated) instead of keeping the
        # freed activations of a step mapped; the GPU's allocator slack is the estimate's
        # `overhead` line, which a CPU estimate leaves out.
        env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    probe = json.loads(line[len("PROBE "):])
    out = {}
    for name in MEASURED:
        spec = TrainingSpec.model_validate(specs[name])
        est = estimate(spec, nodes=1, gpus_per_node=0, shape=resolve_shape(spec.model.path))
        out[name] = (probe[name]["peak"] - probe[name]["base"], est.total)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEASURED))
def test_estimate_matches_measured_peak_rss(measured_runs, name):
    measured, estimated = measured_runs[name]
    assert measured > 300e6, measured  # the model's memory, not noise
    assert within(estimated, measured), (name, f"estimated {estimated / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB")


@pytest.mark.slow  # a fresh interpreter (this one has imported torch)
def test_the_estimate_and_the_admission_check_do_not_import_torch():
    code = ("import sys, kubetune.trainer.api.estimate, kubetune.operator.validation; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


def test_alignment_stages_count_their_frozen_models_and_longer_batches() -> None:
    """DPO with full fine-tuning keeps a frozen reference copy (LoRA does not: adapters off);
    pairs double the sequences; PPO adds a reward model and trains on every sample's answer."""
    from kubetune.trainer.api.estimate import estimate
    from kubetune.trainer.api.specfile import validate_training

    def spec(**extra):
        return validate_training({"model": {"path": "meta-llama/Llama-2-7b-hf"}, "data": {"datasets": [{"path": "d.jsonl"}], "maxLength": 1024},
                                  "train": {"batchSize": 1, "precision": "bf16"}, **extra})

    sft = estimate(spec(method="full"), gpus_per_node=8, params="7B")
    dpo = estimate(spec(stage="dpo", method="full"), gpus_per_node=8, params="7B")
    assert dpo.components["frozen models"] == pytest.approx(sft.components["weights"] * 2 / 3)  # an fp32 copy: 4 of the policy's 6 bytes/param (which add autocast's 16-bit copies)
    assert dpo.components["activations"] == pytest.approx(2 * sft.components["activations"])
    lora_dpo = estimate(spec(stage="dpo", method="lora"), gpus_per_node=8, params="7B")
    assert "frozen models" not in lora_dpo.components
    simpo = estimate(spec(stage="dpo", method="full", dpo={"lossType": "simpo"}), gpus_per_node=8, params="7B")
    assert "frozen models" not in simpo.components
    ppo = estimate(spec(stage="ppo", method="full", reward={"model": "s3://rm"}, generation={"maxNewTokens": 1024, "samplesPerPrompt": 2}),
                   gpus_per_node=8, params="7B")
    assert ppo.components["frozen models"] == pytest.approx(2 * dpo.components["frozen models"])  # reference + reward model
    assert ppo.components["activations"] > 3.9 * sft.components["activations"]  # 2 samples x twice the length
