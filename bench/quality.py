"""Does each stage move its task metric, and what does it cost next to plain TRL at the same budget?

On the repository's own small task (`kubetune.trainer.train.demo`: antonyms, sums and capitals; the
first 40 examples held out of every stage's training data) and the built-in tiny Llama:
  - `sft` from the untrained model: held-out greedy exact match and eval loss before and after,
    kubetune against TRL's SFTTrainer on the same rows (conversational prompt/completion, the
    tokenizer's chat template, loss on the completion);
  - `dpo` from that SFT model on the demo preference pairs (`demo_preferences`): held-out
    preference accuracy (log p(chosen) > log p(rejected)) and exact match, kubetune (sigmoid, its
    defaults plus `rpoAlpha`) against TRL's DPOTrainer with the same beta, steps and learning rate;
  - `raft` from the SFT model with the exact-match reward: held-out greedy exact match (TRL has no
    RAFT; its column is empty).
Both sides get the same steps, batch size and learning rate; kubetune runs with no eval split, so
neither side evaluates while it trains: the metrics are computed afterwards by the same code.
Time is each side's wall time from model load to saved output. A table is printed and written to
bench/results/quality.{json,md}.

    python bench/quality.py            # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HELD_OUT = 40
REWARD = "kubetune.trainer.train.reward_functions:exact_match"


def write_task(directory: Path) -> dict[str, Path]:
    """Alpaca rows and preference pairs, each split into training rows and the held-out 40."""
    from kubetune.trainer.train.data.demo_preferences import demo_preferences
    from kubetune.trainer.train.demo import demo_examples

    rows, pairs = demo_examples(), demo_preferences()
    files = {"train": directory / "train.json", "eval": directory / "eval.json",
             "pairs": directory / "pairs.jsonl", "eval_pairs": directory / "eval_pairs.jsonl"}
    files["train"].write_text(json.dumps(rows[HELD_OUT:]))
    files["eval"].write_text(json.dumps(rows[:HELD_OUT]))
    files["pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[HELD_OUT:]))
    files["eval_pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[:HELD_OUT]))
    return files


def load(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())


def task_metrics(model_dir: str | Path, files: dict[str, Path]) -> dict[str, float]:
    """Held-out greedy exact match, mean answer NLL per token, and preference accuracy."""
    from kubetune.trainer.train.reward_functions import exact_match
    from kubetune.trainer.train.samples import generate_samples

    model, tokenizer = load(model_dir)
    rows = json.loads(files["eval"].read_text())
    prompts = [prompt_ids(tokenizer, r["instruction"]) for r in rows]
    answers = [s["completion"] for s in generate_samples(model, tokenizer, prompts, max_new_tokens=24)]
    match = exact_match([], answers, reference=[r["output"] for r in rows])
    nll = tokens = 0.0
    for prompt, row in zip(prompts, rows, strict=True):
        answer = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        nll -= answer_logp(model, prompt, answer)
        tokens += len(answer)
    wins = 0
    pairs = [json.loads(line) for line in files["eval_pairs"].read_text().splitlines()]
    for pair in pairs:
        prompt = prompt_ids(tokenizer, pair["instruction"])
        chosen, rejected = (tokenizer(pair[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected"))
        wins += answer_logp(model, prompt, chosen) > answer_logp(model, prompt, rejected)
    return {"exact_match": sum(match) / len(match), "answer_nll": nll / tokens, "preference_accuracy": wins / len(pairs)}


def kubetune_run(stage: str, model: str, files: dict[str, Path], out: Path, args, **blocks) -> float:
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.runner import run

    data = {"sft": [{"path": str(files["train"]), "format": "alpaca"}], "dpo": [{"path": str(files["pairs"])}],
            "raft": [{"path": str(files["train"]), "format": "alpaca"}]}[stage]
    spec = {"name": stage, "stage": stage, "model": {"path": model}, "method": "full",
            "data": {"datasets": data, "evalSize": 0, "maxLength": 64},
            "train": {"maxSteps": getattr(args, f"{stage}_steps"), "batchSize": args.batch, "learningRate": getattr(args, f"{stage}_lr"),
                      "seed": args.seed},
            "checkpoint": {"everySteps": 100000}, "logging": {"everySteps": 10, "samples": 0}, "output": {"path": str(out)}}
    spec.update(blocks)
    started = time.perf_counter()
    run(validate_training(spec))
    return time.perf_counter() - started


def trl_sft(model: str, files: dict[str, Path], out: Path, args) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(files["train"].read_text())
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                               "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    started = time.perf_counter()
    policy, tokenizer = load(model)
    config = SFTConfig(output_dir=str(out), max_steps=args.sft_steps, per_device_train_batch_size=args.batch,
                       learning_rate=args.sft_lr, logging_steps=10, save_strategy="no", report_to="none", max_length=64,
                       seed=args.seed, disable_tqdm=True, bf16=False, use_cpu=True)
    SFTTrainer(model=policy.train(), args=config, train_dataset=data, processing_class=tokenizer).train()
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - started


def trl_dpo(model: str, files: dict[str, Path], out: Path, args) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in files["pairs"].read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["instruction"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    started = time.perf_counter()
    policy, tokenizer = load(model)
    config = DPOConfig(output_dir=str(out), max_steps=args.dpo_steps, per_device_train_batch_size=args.batch,
                       learning_rate=args.dpo_lr, beta=args.beta, logging_steps=10, save_strategy="no", report_to="none",
                       seed=args.seed, disable_tqdm=True, bf16=False, use_cpu=True)
    DPOTrainer(model=policy.train(), args=config, train_dataset=data, processing_class=tokenizer).train()
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - started


def compare(stage: str, metrics: list[str], start: str, files: dict[str, Path], work: Path, args, trl=None, **blocks) -> dict:
    """One table row: the metric before, after kubetune, after TRL (if any), and both times."""
    before = task_metrics(start, files)
    seconds = kubetune_run(stage, start, files, work / f"{stage}-kubetune", args, **blocks)
    row = {"stage": stage, "metrics": metrics, "before": before, "kubetune": task_metrics(work / f"{stage}-kubetune", files),
           "kubetune_s": seconds}
    if trl is not None:
        row["trl_s"] = trl(start, files, work / f"{stage}-trl", args)
        row["trl"] = task_metrics(work / f"{stage}-trl", files)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Quality benchmark (bench/quality.py)\n\nMachine: {args.machine}. Task: the demo task, {HELD_OUT} "
             "held-out examples/pairs; built-in tiny Llama (0.5M parameters); full fine-tuning; "
             f"batch {args.batch}, seeds {args.seeds}. Metric before -> after; time is wall time from model load to "
             "saved output. kubetune's dpo runs its defaults (rpoAlpha 1); TRL's is plain DPO at the same beta.\n",
             "| stage | seed | metric | before | kubetune | TRL | kubetune s | TRL s | time ratio (kubetune/TRL) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in r["metrics"]:
            trl = f"{r['trl'][m]:.3f}" if "trl" in r else "n/a"
            trl_s = f"{r['trl_s']:.1f}" if "trl_s" in r else "n/a"
            ratio = f"{r['kubetune_s'] / r['trl_s']:.2f}" if "trl_s" in r else "n/a"
            lines.append(f"| {r['stage']} | {r['seed']} | {m} | {r['before'][m]:.3f} | {r['kubetune'][m]:.3f} | {trl} | {r['kubetune_s']:.1f} | {trl_s} | {ratio} |")
    lines.append("\nAll metrics of each model (exact match, answer NLL per token, preference accuracy) are in quality.json.")
    return "\n".join(lines) + "\n"


def one_seed(args) -> list[dict]:
    """sft from the untrained model, then dpo and raft from kubetune's SFT output, for one seed."""
    from kubetune.trainer.api.spec import StorageSpec
    from kubetune.trainer.train.models.locations import resolve_location

    with tempfile.TemporaryDirectory(prefix="kubetune-quality-") as tmp:
        work = Path(tmp)
        files = write_task(work)
        base = resolve_location("builtin:tiny-llama", StorageSpec(), "model.path")  # a directory TRL can load too
        rows = [compare("sft", ["exact_match", "answer_nll"], base, files, work, args, trl=trl_sft)]
        sft = str(work / "sft-kubetune")
        rows.append(compare("dpo", ["preference_accuracy", "exact_match", "answer_nll"], sft, files, work, args, trl=trl_dpo,
                            dpo={"lossType": "sigmoid", "beta": args.beta, "rpoAlpha": args.rpo_alpha}))
        rows.append(compare("raft", ["exact_match"], sft, files, work, args, reward={"function": REWARD},
                            generation={"maxNewTokens": 24, "samplesPerPrompt": 8, "temperature": 0.7}))
    return [{**row, "seed": args.seed} for row in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1, help="dpo.beta for both (kubetune's default: 0.1)")
    p.add_argument("--rpo-alpha", type=float, default=1.0, help="kubetune dpo.rpoAlpha (its default: 1)")
    p.add_argument("--raft-steps", type=int, default=30)
    p.add_argument("--raft-lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full pass per seed (data order, sampling)")
    p.add_argument("--machine", default=f"{platform.machine()}, CPU only")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = p.parse_args(argv)
    rows = [row for seed in args.seeds for row in one_seed(argparse.Namespace(**{**vars(args), "seed": seed}))]
    table = markdown(rows, args)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "quality.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
        (RESULTS / "quality.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
