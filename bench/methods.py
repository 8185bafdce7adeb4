"""Fine-tuning methods side by side: throughput, peak memory, trainable parameters, final loss.

For each method (full, freeze, lora, qlora, dora, galore) the same model, data and settings run
in fresh processes so peak memory is the method's own (interleaved pairs, `--repeats`, median ratio):
  - through kubetune (`kubetune.trainer.train.runner.run`), and
  - through a plain `transformers.Trainer` with PEFT / bitsandbytes / GaLore set up by hand,
    on the same tokenized data (the baseline: what the toolkit would cost over doing it yourself).
Throughput is tokens per second of the training loop (the trainer's `train_runtime`, which
excludes loading and saving). The model FLOPs utilisation is the method's model FLOPs per token
times tokens/s over a measured matmul peak of the same device: 2N forward + 2N for the gradients
of the activations + 2N_t for the weight gradients (N parameters, N_t trainable), i.e. the usual
6N for full fine-tuning but ~4N for LoRA/freeze, which compute no gradient for frozen weights.
One table is printed (the shape of LlamaFactory's Table 3) and
written to bench/results/methods.{json,md}.

    python bench/methods.py                 # CPU here: a ~3.5M-parameter Llama, a few minutes
    python bench/methods.py --hidden 2048 --layers 16 --steps 50   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ["full", "freeze", "lora", "qlora", "dora", "galore"]


def method_blocks(method: str) -> dict:
    """Spec fields for each benchmarked method."""
    return {
        "full": {"method": "full"},
        "freeze": {"method": "freeze", "freeze": {"trainableLayers": 1}},
        "lora": {"method": "lora", "lora": {"rank": 8}},
        "qlora": {"method": "qlora", "lora": {"rank": 8}},
        "dora": {"method": "lora", "lora": {"rank": 8, "useDora": True}},
        "galore": {"method": "galore", "galore": {"rank": 8, "updateInterval": 10, "targetModules": ["attn", "mlp"]}},
    }[method]


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    from kubetune.trainer.train.models.builtin import build_tiny_llama

    if not (directory / "config.json").is_file():
        heads = max(1, hidden // 64)
        build_tiny_llama(directory, vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512)
    return directory


def make_spec(method: str, model_dir: Path, out: Path, args) -> dict:
    spec = {
        "name": f"bench-{method}",
        "stage": "sft",
        "model": {"path": str(model_dir)},
        "data": {"datasets": [{"path": str(REPO / "examples" / "data" / "demo_alpaca.json"), "format": "alpaca"}],
                 "maxLength": args.max_length, "shuffle": False},
        "train": {"maxSteps": args.steps, "batchSize": args.batch_size, "learningRate": 1e-3, "scheduler": "constant",
                  "seed": 0},
        "checkpoint": {"everySteps": 10_000},
        "logging": {"everySteps": max(1, args.steps // 5), "samples": 0, "level": "warning"},
        "output": {"path": str(out)},
    }
    spec.update(method_blocks(method))
    return spec


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_kubetune(spec_doc: dict) -> dict:
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.models.methods import count_parameters
    from kubetune.trainer.train.runner import run

    spec = validate_training(spec_doc)
    seen: dict = {}
    import kubetune.trainer.train.models.methods as methods

    original = methods.apply_method

    def spy(model, s):
        wrapped = original(model, s)
        seen["params"] = count_parameters(wrapped)
        return wrapped

    methods.apply_method = spy
    result = run(spec)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if "train_runtime" in r)
    losses = [r["loss"] for r in records if "loss" in r]
    return {"train_runtime": final["train_runtime"], "final_loss": losses[-1], "trainable": seen["params"][0],
            "total": seen["params"][1]}


def run_baseline(spec_doc: dict) -> dict:
    """The same workload with transformers.Trainer, the method set up by hand."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.data import build_datasets

    spec = validate_training(spec_doc)
    tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
    data = build_datasets(spec, tokenizer)  # the same rows kubetune trains on
    method = spec_doc["name"].removeprefix("bench-")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if method == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(spec.model.path, quantization_config=quant, dtype=torch.float32)
    model.config.use_cache = False
    optim_kwargs = {"optim": "adamw_torch"}
    if method == "freeze":
        for name, param in model.named_parameters():
            param.requires_grad_(f"layers.{model.config.num_hidden_layers - 1}." in name)
    elif method in ("lora", "qlora", "dora"):
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules="all-linear", use_dora=method == "dora"))
    elif method == "galore":
        optim_kwargs = {"optim": "galore_adamw", "optim_target_modules": ["attn", "mlp"],
                        "optim_args": "rank=8, update_proj_gap=10, scale=0.25"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    out = Path(spec.output_path)
    args = TrainingArguments(output_dir=str(out), max_steps=spec.train.maxSteps, per_device_train_batch_size=spec.train.batchSize,
                             learning_rate=spec.train.learningRate, lr_scheduler_type="constant", seed=0, report_to="none",
                             logging_steps=spec.logging.everySteps, save_strategy="no", remove_unused_columns=False,
                             dataloader_pin_memory=False, disable_tqdm=True, **optim_kwargs)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=collator)
    output = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"train_runtime": output.metrics["train_runtime"], "final_loss": losses[-1], "trainable": trainable, "total": total}


def count_tokens(spec_doc: dict) -> int:
    """Tokens the loop consumes (steps x batch x mean row length): the same for both implementations."""
    from transformers import AutoTokenizer

    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.data import build_datasets

    spec = validate_training(spec_doc)
    data = build_datasets(spec, AutoTokenizer.from_pretrained(spec.model.path))
    mean_length = sum(len(ids) for ids in data.train["input_ids"]) / len(data.train)
    return int(spec.train.maxSteps * spec.train.batchSize * mean_length)


def model_flops_per_token(total: int, trainable: int) -> float:
    """Forward (2N) + activation gradients (2N) + weight gradients (2N_t): 6N only when everything
    trains. (Activation gradients are needed down to the first trainable layer; counting them
    everywhere slightly overstates freeze with only the last layers trainable.)"""
    return 4 * total + 2 * trainable


def matmul_peak_flops() -> float:
    """Measured dense matmul FLOP/s of this device (fp32 on CPU, bf16 on GPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 4096 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 50 if device == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    spec_doc = json.loads(args.spec)
    result = run_kubetune(spec_doc) if args.impl == "kubetune" else run_baseline(spec_doc)
    result["peak_memory_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result))


def measure(method: str, impl: str, spec_doc: dict) -> dict:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--spec", json.dumps(spec_doc)],
                          capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{method}/{impl} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved kubetune/baseline pairs per method (median reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from tqdm import tqdm

    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    model_dir = build_model(work / "model", args.hidden, args.layers)
    peak = matmul_peak_flops()
    rows = []
    for method in tqdm(args.methods, desc="methods"):
        doc = make_spec(method, model_dir, work / f"out-{method}", args)
        tokens = count_tokens(doc)
        # Interleaved pairs (ours, then the baseline, `--repeats` times), each in a fresh process:
        # a pair shares the machine's state of the moment, and the median pair ratio ignores the
        # odd disturbed run that a single measurement on a shared 2-core machine would report.
        pairs = []
        for repeat in range(args.repeats):
            ours = measure(method, "kubetune", {**doc, "output": {"path": str(work / f"out-{method}-{repeat}")}})
            base = measure(method, "baseline", {**doc, "output": {"path": str(work / f"base-{method}-{repeat}")}})
            pairs.append((ours, base))
        pairs.sort(key=lambda pair: pair[1]["train_runtime"] / pair[0]["train_runtime"])
        ours, base = pairs[len(pairs) // 2]  # the median ratio's pair
        tps, base_tps = tokens / ours["train_runtime"], tokens / base["train_runtime"]
        rows.append({
            "method": method, "trainable_params": ours["trainable"], "total_params": ours["total"],
            "peak_memory_mb": round(ours["peak_memory_mb"], 1), "baseline_peak_memory_mb": round(base["peak_memory_mb"], 1),
            "tokens_per_second": round(tps, 1), "baseline_tokens_per_second": round(base_tps, 1),
            "throughput_ratio": round(tps / base_tps, 3), "final_loss": round(ours["final_loss"], 4),
            "baseline_final_loss": round(base["final_loss"], 4),
            "mfu_percent": round(100 * model_flops_per_token(ours["total"], ours["trainable"]) * tps / peak, 2),
        })
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = ("| method | trainable params | peak mem (MB) | tokens/s | vs Trainer | final loss | MFU % |\n"
              "|---|---|---|---|---|---|---|")
    lines = [f"| {r['method']} | {r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%) | "
             f"{r['peak_memory_mb']:.0f} (Trainer {r['baseline_peak_memory_mb']:.0f}) | {r['tokens_per_second']:.0f} | "
             f"{r['throughput_ratio']:.2f}x | {r['final_loss']:.3f} (Trainer {r['baseline_final_loss']:.3f}) | {r['mfu_percent']:.2f} |"
             for r in rows]
    title = (f"Methods on {device}: Llama hidden {args.hidden}, {args.layers} layers, {args.steps} steps "
             f"(median of {args.repeats} interleaved pairs), "
             f"batch {args.batch_size} x {args.max_length} tokens; matmul peak {peak / 1e9:.1f} GFLOP/s")
    table = "\n".join([title, "", header, *lines])
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps({"device": device, "settings": vars(args), "matmul_peak_flops": peak,
                                                      "rows": rows}, indent=1, default=str))
    (RESULTS / "methods.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
