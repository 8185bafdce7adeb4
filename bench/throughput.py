"""Training throughput: kubetune (its default spec) against plain TRL and LlamaFactory 0.9.5.

The same task in all three: one locally built Llama (`--hidden 512 --layers 4`, a byte-level BPE
tokenizer of 8192 tokens trained by kubetune's builtin-model code on the benchmark's own text:
~21M parameters), the same seeded data, the same method and hyper-parameters:

  - LoRA SFT: all linear layers, r 8, alpha 16, lr 1e-4, batch 4, cutoff 512, one epoch;
  - full SFT and QLoRA SFT (4-bit NF4 bitsandbytes, LoRA as above): the same otherwise;
  - DPO: LoRA as above on the preference pairs (the reference is the adapter-less model).

Everything else is each tool's own default, on purpose:
  - kubetune: `kubetune train SPEC.yaml` with only model, dataset, method (+ LoRA r/alpha), lr,
    batch size, max length, epochs and the output path (row "kubetune");
  - TRL: `trl.SFTTrainer` / `trl.DPOTrainer` with `SFTConfig`/`DPOConfig` given the same task and
    a PEFT `LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")`. TRL's defaults stay,
    gradient checkpointing on included; one is changed where it cannot run: its bf16=True makes
    transformers refuse to start without a GPU, so on CPU bf16 is off (fp32, like the others);
    QLoRA loads the model with `BitsAndBytesConfig` NF4 + double quantisation, fp32 compute;
  - LlamaFactory: `llamafactory-cli train config.yaml` from its own venv
    (bench/setup-llamafactory.sh), `finetuning_type`, `lora_target: all`, `lora_rank/alpha`,
    `quantization_bit: 4`, `cutoff_len`, reporting and eval off.
LoRA dropout stays each tool's default (kubetune 0.05, PEFT/TRL 0, LlamaFactory 0). kubetune's
default DPO adds the chosen answers' NLL (`dpo.rpoAlpha: 1`), so its DPO loss is not comparable
with the others' plain sigmoid loss (0.693 at the start).

What each renders (one alpaca row; the tokenizer's chat template is kubetune's `default`):
  - kubetune: alpaca data + a tokenizer with a chat template -> that template:
    `<s>User: {instruction}\\n{input}\\nAssistant: {output}</s>`, loss on the response only (the
    template's `\\n` after `</s>` is not trained on: one token per row fewer than the others);
  - TRL: the rows as conversational prompt/completion (`[{"role": "user", ...}]` /
    `[{"role": "assistant", ...}]`), which TRL renders with the same chat template:
    `<s>User: {instruction}\\n{input}\\nAssistant: {output}</s>\\n`, completion-only loss (its
    default for prompt/completion data);
  - LlamaFactory: no `template` given, so it parses the tokenizer's chat template into its own
    template (`parse_template`): the same text as TRL (prompt and response tokenized apart),
    response-only loss (`train_on_prompt` off). The results file records each one's rendering
    of a short row (`rendered`).
DPO: the same prompt rendering, chosen/rejected as the assistant turn.

Useful tokens: the non-padding tokens of the batches each tool actually trained on, counted in
the training process itself (the `attention_mask` sum of every batch entering
`Trainer.training_step`, the base class of all three trainers; for DPO a batch holds
prompt+chosen and prompt+rejected rows, so the prompt counts twice, as it is computed twice).
kubetune and LlamaFactory keep every row, truncated to the cutoff; TRL truncates to its
`max_length` (512 here); a tool that drops or truncates rows differently trains on fewer tokens,
and is credited only with those. Tokens/s = useful tokens / the wall time of `Trainer.train`
(the training loop, with its callbacks, without loading and saving).

Per run, each a fresh process (interleaved: every round runs every tool once per method, the
order rotating between rounds; `OMP_NUM_THREADS` fixed, `--threads`, default 2):
peak RSS of the process tree (`os.wait4`'s rusage of the child), time to the first optimizer
step from the process start (a global `torch.optim` step hook), the final train loss (mean
of the last 10 steps' losses), and the process CPU time of `Trainer.train` (tokens/CPU-s: steadier
than wall time on a shared machine). The table shows the median over rounds.

    python bench/throughput.py                 # 400 rows, 3 rounds, the 21M model
    python bench/throughput.py --quick         # 80 rows, 2 rounds, a 128x2 model: ~10 minutes here
    python bench/throughput.py --rounds 1 --rows 40 --methods lora   # smoke test

Writes bench/results/throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KUBETUNE_BENCH_RESULTS") or REPO / "bench" / "results")  # bench/gpu.sh: its own folder
TOOLS = ["kubetune", "trl", "llamafactory"]
METHODS = ["lora", "full", "qlora", "dpo"]
LF_VERSION = "0.9.5"
LORA_R, LORA_ALPHA, LR, BATCH, CUTOFF = 8, 16, 1e-4, 4, 512
LOSS_WINDOW = 10


# ----------------------------------------------------------------------------- data and model


def word_list(seed: int, count: int = 6000) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def make_data(directory: Path, rows: int, seed: int) -> dict:
    """alpaca.json (instruction/input/output, 5-150 words each) and prefs.jsonl (+ a rejected
    answer), and LlamaFactory's dataset_info.json, all in `directory`."""
    rng = random.Random(seed)
    words = word_list(seed)

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 150))) + "."

    alpaca = [{"instruction": text(), "input": text(), "output": text()} for _ in range(rows)]
    prefs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": text()} for r in alpaca]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "alpaca.json").write_text(json.dumps(alpaca, indent=0))
    (directory / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    info = {
        "bench_alpaca": {"file_name": "alpaca.json", "formatting": "alpaca",
                         "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
        "bench_prefs": {"file_name": "prefs.jsonl", "formatting": "alpaca", "ranking": True,
                        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    }
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return {"alpaca": alpaca, "prefs": prefs}


def build_model(directory: Path, hidden: int, layers: int, corpus: list[str], vocab: int = 8192) -> int:
    """A random Llama + kubetune's builtin byte-level BPE tokenizer (trained on the benchmark
    text) with kubetune's `default` chat template; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.train.data.templates import TEMPLATES
    from kubetune.trainer.train.demo import demo_corpus
    from kubetune.trainer.train.models.builtin import train_tokenizer

    tokenizer = train_tokenizer(demo_corpus() + corpus, vocab)
    tokenizer.model_max_length = 1024
    tokenizer.chat_template = TEMPLATES["default"]
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, hidden_size=hidden,
                         intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- per-tool configs


def kubetune_spec(method: str, work: Path, out: Path) -> dict:
    """The default spec: the task, nothing else."""
    dpo = method == "dpo"
    spec = {
        "name": f"bench-{method}",
        "stage": "dpo" if dpo else "sft",
        "model": {"path": str(work / "model")},
        "data": {"datasets": [{"path": str(work / "data" / ("prefs.jsonl" if dpo else "alpaca.json"))}], "maxLength": CUTOFF},
        "method": "lora" if dpo else method,
        "train": {"epochs": 1, "batchSize": BATCH, "learningRate": LR},
        "output": {"path": str(out)},
    }
    if method != "full":
        spec["lora"] = {"rank": LORA_R, "alpha": LORA_ALPHA}
    return spec


def llamafactory_config(method: str, work: Path, out: Path) -> dict:
    config = {
        "model_name_or_path": str(work / "model"),
        "stage": "dpo" if method == "dpo" else "sft",
        "do_train": True,
        "finetuning_type": "full" if method == "full" else "lora",
        "dataset": "bench_prefs" if method == "dpo" else "bench_alpaca",
        "dataset_dir": str(work / "data"),
        "cutoff_len": CUTOFF,
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": BATCH,
        "learning_rate": LR,
        "num_train_epochs": 1.0,
        "report_to": "none",
        "do_eval": False,
        "plot_loss": False,
    }
    if method != "full":
        config.update(lora_target="all", lora_rank=LORA_R, lora_alpha=LORA_ALPHA)
    if method == "qlora":
        config.update(quantization_bit=4, quantization_method="bnb")
    return config


def bf16_supported() -> bool:
    """TRL's default bf16=True where it can start: transformers refuses bf16 without a GPU
    ("Your setup doesn't support bf16/gpu") unless told `use_cpu`: on CPU, fp32 like the others."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def run_trl(method: str, work: Path, out: Path) -> None:
    """Plain TRL: the same model, data, method and hyper-parameters, TRL's defaults otherwise."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir = str(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant)
    peft_config = None if method == "full" else LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                           task_type="CAUSAL_LM")
    common = {"output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": BATCH, "learning_rate": LR,
              "max_length": CUTOFF, "report_to": "none",
              # the one TRL default changed, and only where it cannot run (bf16_supported)
              "bf16": bf16_supported()}

    def prompt(row: dict) -> list[dict]:
        return [{"role": "user", "content": "\n".join(p for p in (row["instruction"], row["input"]) if p)}]

    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(line) for line in (work / "data" / "prefs.jsonl").read_text().splitlines()]
        data = Dataset.from_list([{"prompt": prompt(r), "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    else:
        from trl import SFTConfig, SFTTrainer

        rows = json.loads((work / "data" / "alpaca.json").read_text())
        data = Dataset.from_list([{"prompt": prompt(r), "completion": [{"role": "assistant", "content": r["output"]}]}
                                  for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(out))


# ----------------------------------------------------------------------------- the child process


def child(tool: str, method: str, work: Path, out: Path, result_file: Path) -> None:
    """Run one tool in this (fresh) process with measuring hooks; write the measurements."""
    t0 = float(os.environ["THROUGHPUT_T0"])
    import transformers

    m: dict = {"tokens": 0, "steps": 0, "losses": [], "first_step_s": None, "train_s": None}

    def on_step(optimizer, args, kwargs):
        m["steps"] += 1
        if m["first_step_s"] is None:
            m["first_step_s"] = time.time() - t0

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(on_step)
    trainer_cls = transformers.Trainer
    original_step, original_train = trainer_cls.training_step, trainer_cls.train

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            m["tokens"] += int(mask.sum())
        else:  # padding-free batches: every token is a real one
            m["tokens"] += int(inputs["input_ids"].numel())
        loss = original_step(self, model, inputs, *args, **kwargs)
        m["losses"].append(float(loss))
        return loss

    def train(self, *args, **kwargs):
        start, cpu_start = time.time(), time.process_time()
        try:
            return original_train(self, *args, **kwargs)
        finally:
            m["train_s"], m["train_cpu_s"] = time.time() - start, time.process_time() - cpu_start

    trainer_cls.training_step, trainer_cls.train = training_step, train
    try:
        if tool == "kubetune":
            from kubetune.trainer.cli.main import main

            spec_file = out.parent / f"{out.name}.yaml"
            import yaml

            spec_file.write_text(yaml.safe_dump(kubetune_spec(method, work, out), sort_keys=False))
            sys.argv = ["kubetune", "train", str(spec_file)]
            code = main()
            if code not in (None, 0):
                raise SystemExit(code)
        elif tool == "llamafactory":
            import yaml
            from llamafactory.cli import main

            config_file = out.parent / f"{out.name}.yaml"
            config_file.write_text(yaml.safe_dump(llamafactory_config(method, work, out), sort_keys=False))
            sys.argv = ["llamafactory-cli", "train", str(config_file)]
            main()
        else:
            run_trl(method, work, out)
    finally:
        m["wall_s"] = time.time() - t0
        result_file.write_text(json.dumps(m))


# ----------------------------------------------------------------------------- the parent


def lf_python(no_llamafactory: bool) -> tuple[Path | None, str | None]:
    if no_llamafactory:
        return None, "--no-llamafactory"
    venv = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune")) / f"llamafactory-{LF_VERSION}"
    cli = venv / "bin" / "llamafactory-cli"
    if not (cli.exists() and subprocess.run([str(cli), "version"], capture_output=True).returncode == 0):
        print(f"setting up LlamaFactory {LF_VERSION} in {venv} (bench/setup-llamafactory.sh)...", flush=True)
        done = subprocess.run(["bash", str(REPO / "bench" / "setup-llamafactory.sh")])
        if done.returncode != 0:
            return None, "bench/setup-llamafactory.sh failed"
    return venv / "bin" / "python", None


def run_one(tool: str, method: str, python: str, work: Path, threads: int, log_dir: Path) -> dict:
    tag = f"{tool}-{method}-{time.time_ns()}"
    out = work / "runs" / tag
    out.parent.mkdir(parents=True, exist_ok=True)
    result_file = work / "runs" / f"{tag}.result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONSAFEPATH": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "runs" / f"{tag}.hfcache"), "KUBETUNE_CACHE": str(work / "runs" / f"{tag}.ktcache"),
           "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    env.pop("VIRTUAL_ENV", None)
    command = [python, str(Path(__file__).resolve()), "_child", tool, method, str(work), str(out), str(result_file)]
    log_file = log_dir / f"{tag}.log"
    with log_file.open("w") as log:
        env["THROUGHPUT_T0"] = repr(time.time())
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    record = {"tool": tool, "method": method, "rc": code, "peak_rss_mb": usage.ru_maxrss / 1024, "log": str(log_file)}
    if result_file.is_file():
        record.update(json.loads(result_file.read_text()))
    if code != 0 or not record.get("steps"):
        record["error"] = last_error(log_file)
    losses = record.pop("losses", [])
    if losses:
        record["final_loss"] = statistics.fmean(losses[-LOSS_WINDOW:])
        record["first_loss"] = losses[0]
    if record.get("train_s") and record.get("tokens"):
        record["tokens_per_s"] = record["tokens"] / record["train_s"]
    if record.get("train_cpu_s") and record.get("tokens"):
        record["tokens_per_cpu_s"] = record["tokens"] / record["train_cpu_s"]
    shutil.rmtree(out, ignore_errors=True)
    return record


def last_error(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def rendered_examples(work: Path, lf: Path | None) -> dict:
    """The text each tool trains on for the first row (kubetune/TRL: the chat template;
    LlamaFactory: its parsed template, rendered in its venv)."""
    from transformers import AutoTokenizer

    row = json.loads((work / "data" / "alpaca.json").read_text())[0]
    short = {k: " ".join(v.split()[:3]) for k, v in row.items()}
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    messages = [{"role": "user", "content": f"{short['instruction']}\n{short['input']}"},
                {"role": "assistant", "content": short["output"]}]
    with tempfile.TemporaryDirectory() as tmp:  # kubetune: its own data pipeline's token row, decoded
        from kubetune.trainer.api.specfile import validate_training
        from kubetune.trainer.train.data import build_datasets

        (Path(tmp) / "row.json").write_text(json.dumps([short]))
        spec = kubetune_spec("lora", work, Path(tmp) / "out")
        spec["data"]["datasets"][0]["path"] = str(Path(tmp) / "row.json")
        kubetune_ids = build_datasets(validate_training(spec), tokenizer).train[0]["input_ids"]
    # TRL: conversational prompt/completion, rendered with the tokenizer's chat template
    shown = {"kubetune": tokenizer.decode(kubetune_ids), "trl": tokenizer.apply_chat_template(messages, tokenize=False)}
    if lf is not None:
        script = (
            "import json,sys\nfrom transformers import AutoTokenizer\n"
            "from llamafactory.data.template import get_template_and_fix_tokenizer\n"
            "from llamafactory.hparams import DataArguments\n"
            "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "t = get_template_and_fix_tokenizer(tok, DataArguments())\n"
            "p, r = t.encode_oneturn(tok, json.loads(sys.argv[2]))\n"
            "print(json.dumps(tok.decode(p + r)))\n"
        )
        done = subprocess.run([str(lf), "-c", script, str(work / "model"), json.dumps(messages)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONSAFEPATH": "1", "DISABLE_VERSION_CHECK": "1"})
        shown["llamafactory"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
            f"(could not render: {done.stderr.strip().splitlines()[-1:] })"
    return shown


def helper(argv: list[str]) -> str:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], check=True, capture_output=True,
                          text=True, env=env).stdout


def versions(python: str) -> dict:
    script = ("import json, importlib.metadata as m\nout = {}\n"
              "for p in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'accelerate', 'datasets', 'llamafactory', 'kubetune'):\n"
              "    try: out[p] = m.version(p)\n    except Exception: pass\nprint(json.dumps(out))")
    done = subprocess.run([python, "-c", script], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], tools: list[str], methods: list[str], skipped: dict) -> list[dict]:
    rows = []
    for method in methods:
        per_tool = {}
        for tool in tools:
            ok = [r for r in runs if r["tool"] == tool and r["method"] == method and r.get("tokens_per_s")]
            failed = [r for r in runs if r["tool"] == tool and r["method"] == method and not r.get("tokens_per_s")]
            entry = {"tool": tool, "method": method, "runs": len(ok)}
            if (tool, method) in skipped:
                entry["na"] = skipped[(tool, method)]
            elif not ok:
                entry["na"] = failed[0].get("error", "failed") if failed else "not run"
            else:
                entry.update({k: median(ok, k) for k in ("tokens_per_s", "tokens_per_cpu_s", "tokens", "train_s", "peak_rss_mb",
                                                        "first_step_s", "final_loss", "steps")})
            per_tool[tool] = entry
        for tool in tools:
            entry = per_tool[tool]
            for ref in ("trl", "llamafactory"):
                other = per_tool.get(ref, {})
                if entry.get("tokens_per_s") and other.get("tokens_per_s"):
                    entry[f"vs_{ref}"] = entry["tokens_per_s"] / other["tokens_per_s"]
                if entry.get("tokens_per_cpu_s") and other.get("tokens_per_cpu_s"):
                    entry[f"cpu_vs_{ref}"] = entry["tokens_per_cpu_s"] / other["tokens_per_cpu_s"]
            rows.append(entry)
    return rows


def summary_line(rows: list[dict], method: str = "lora") -> str:
    """The run in one line (LoRA SFT, the issue's headline; another method when LoRA was not run):
    `throughput: kubetune/TRL X.XXx, kubetune/LlamaFactory Y.YYx, RSS kubetune/TRL Z.ZZx`."""
    by = {(r["method"], r["tool"]): r for r in rows}
    if ("lora", "kubetune") not in by and rows:
        method = rows[0]["method"]
    ours, trl = by.get((method, "kubetune"), {}), by.get((method, "trl"), {})

    def ratio(value) -> str:
        return f"{value:.2f}x" if value else "n/a"

    rss = ours["peak_rss_mb"] / trl["peak_rss_mb"] if ours.get("peak_rss_mb") and trl.get("peak_rss_mb") else None
    return (f"throughput ({method}): kubetune/TRL {ratio(ours.get('vs_trl'))}, kubetune/LlamaFactory "
            f"{ratio(ours.get('vs_llamafactory'))}, RSS kubetune/TRL {ratio(rss)}")


def fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict]) -> str:
    head = ("| method | tool | useful tokens/s | vs TRL | vs LlamaFactory | tokens/CPU-s | CPU vs TRL | CPU vs LlamaFactory | "
            "peak RSS (MB) | first step (s) | final loss | tokens | steps |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['method']} | {r['tool']} | n/a: {r['na'].replace('|', '/')} | | | | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['tool']} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r.get('vs_trl'), '.2f', 'x')} | "
                     f"{fmt(r.get('vs_llamafactory'), '.2f', 'x')} | {fmt(r.get('tokens_per_cpu_s'), '.0f')} | "
                     f"{fmt(r.get('cpu_vs_trl'), '.2f', 'x')} | {fmt(r.get('cpu_vs_llamafactory'), '.2f', 'x')} | "
                     f"{fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{fmt(r['first_step_s'], '.1f')} | {fmt(r['final_loss'], '.3f')} | {fmt(r['tokens'], '.0f')} | "
                     f"{fmt(r['steps'], '.0f')} |")
    return head + "\n".join(lines) + "\n"


def chart(rows: list[dict], tools: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        values = [next((r.get("tokens_per_s") or 0 for r in rows if r["tool"] == tool and r["method"] == m), 0)
                  for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], values, width, label=tool)
    ax.set_xticks([j + width * (len(tools) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel("useful tokens/s (median)")
    ax.set_title("Training throughput (CPU; 0 = could not run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(args, context: dict, runs: list[dict], tools: list[str], methods: list[str], skipped: dict,
                 completed: int, started: float, load_start: tuple) -> None:
    rows = summarize(runs, tools, methods, skipped)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": time.time() - started,
              "rounds_completed": completed, **context, "summary": rows, "runs": runs}
    report["machine"] = {**context["machine"], "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    params = context["settings"]["parameters"]
    plural = "s" if args.rounds > 1 else ""
    rounds = f"{completed} interleaved round{plural}" if completed == args.rounds else f"{completed} of {args.rounds} rounds"
    header = (f"Training throughput, {report['date']}: {params / 1e6:.1f}M-parameter Llama (hidden {args.hidden}, "
              f"{args.layers} layers), {args.rows} alpaca rows, 1 epoch, batch {BATCH}, cutoff {CUTOFF}, lr {LR:g}, "
              f"LoRA r {LORA_R} alpha {LORA_ALPHA}; {rounds} (median), OMP_NUM_THREADS={args.threads}, "
              f"{os.cpu_count()} CPUs, no GPU, load average {load_start[0]:.1f} at the start and "
              f"{report['machine']['loadavg_end'][0]:.1f} at the end. "
              f"`python bench/throughput.py {' '.join(context['argv'])}`\n\n")
    rendered = "\n".join(f"- {tool}: `{json.dumps(text)[1:-1]}`" for tool, text in report["rendered"].items())
    notes = ("\nMedians over rounds. Useful tokens/s: non-padding tokens of the batches each tool trained on / "
             "the wall time of `Trainer.train`; tokens/CPU-s: the same tokens / the process CPU time of `Trainer.train` "
             "(all threads; steadier than wall time when the machine is shared); first step: seconds from the process start to the first optimizer "
             "step; final loss: mean of the last 10 steps (kubetune's DPO default adds the chosen answers' NLL, "
             "`dpo.rpoAlpha: 1`: not comparable with the plain DPO loss of the others). kubetune runs its default "
             "spec; TRL its defaults (gradient checkpointing on; bf16 off, as transformers refuses it without a GPU); "
             "LlamaFactory its defaults. Each renders a row as (first 3 words per field):\n\n" + rendered + "\n")
    (RESULTS / f"{args.name}.md").write_text(header + table(rows) + "\n" + summary_line(rows) + "\n" + notes)
    chart(rows, tools, methods, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json, .md, .png ({completed} of {args.rounds} rounds)", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 2)")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 400; --quick 80)")
    parser.add_argument("--hidden", type=int, default=None, help="model hidden size (default 512; --quick 128)")
    parser.add_argument("--layers", type=int, default=None, help="model layers (default 4; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="80 rows, 2 rounds, a 128x2 model (~10 minutes on 2 CPU cores)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--no-llamafactory", action="store_true", help="skip LlamaFactory (no venv set up)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, data and logs here")
    parser.add_argument("--no-write", action="store_true", help="print the table only, do not write bench/results")
    parser.add_argument("--name", default="throughput",
                        help="results file stem under bench/results (default throughput; e.g. throughput-full)")
    args = parser.parse_args(argv)
    quick = {"rounds": 2, "rows": 80, "hidden": 128, "layers": 2}
    full = {"rounds": 3, "rows": 400, "hidden": 512, "layers": 4}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str]) -> int:
    # Helper commands, run in subprocesses: the parent imports neither torch nor transformers, since
    # a child's peak RSS (`ru_maxrss`) starts from the parent's at the fork.
    if argv[:1] == ["_child"]:
        tool, method, work, out, result = argv[1:6]
        child(tool, method, Path(work), Path(out), Path(result))
        return 0
    if argv[:1] == ["_build"]:
        work, hidden, layers = Path(argv[1]), int(argv[2]), int(argv[3])
        alpaca = json.loads((work / "data" / "alpaca.json").read_text())
        prefs = [json.loads(line) for line in (work / "data" / "prefs.jsonl").read_text().splitlines()]
        corpus = [r[k] for r in alpaca for k in ("instruction", "input", "output")] + [r["rejected"] for r in prefs]
        print(json.dumps(build_model(work / "model", hidden, layers, corpus)))
        return 0
    if argv[:1] == ["_render"]:
        print(json.dumps(rendered_examples(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None)))
        return 0
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    started, load_start = time.time(), os.getloadavg()
    make_data(work / "data", args.rows, args.seed)
    params = json.loads(helper(["_build", str(work), str(args.hidden), str(args.layers)]).splitlines()[-1])
    print(f"model: {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); data: {args.rows} rows; "
          f"work dir {work}", flush=True)

    skipped: dict = {}
    pythons = {"kubetune": sys.executable, "trl": sys.executable}
    lf = None
    if "llamafactory" in tools:
        lf, reason = lf_python(args.no_llamafactory)
        if lf is None:
            print(f"LlamaFactory skipped: {reason}", flush=True)
            for m in methods:
                skipped[("llamafactory", m)] = f"skipped ({reason})"
        else:
            pythons["llamafactory"] = str(lf)
    context = {
        "argv": argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"rounds": args.rounds, "rows": args.rows, "hidden": args.hidden, "layers": args.layers,
                     "parameters": params, "threads": args.threads, "seed": args.seed, "quick": args.quick,
                     "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lr": LR, "batch": BATCH, "cutoff": CUTOFF, "epochs": 1},
        "versions": {"kubetune_venv": versions(sys.executable),
                     **({"llamafactory_venv": versions(str(lf))} if lf else {})},
        "kubetune_spec_lora": kubetune_spec("lora", Path("WORK"), Path("OUT")),
        "llamafactory_config_lora": llamafactory_config("lora", Path("WORK"), Path("OUT")),
        "rendered": json.loads(helper(["_render", str(work)] + ([str(lf)] if lf else [])).splitlines()[-1]),
    }
    runs: list[dict] = []
    for round_index in range(args.rounds):
        order = tools[round_index % len(tools):] + tools[:round_index % len(tools)]
        for method in methods:
            for tool in order:
                if (tool, method) in skipped:
                    continue
                record = run_one(tool, method, pythons[tool], work, args.threads, log_dir)
                record["round"] = round_index
                runs.append(record)
                status = f"{record['tokens_per_s']:.0f} tok/s" if record.get("tokens_per_s") else f"FAILED: {record.get('error')}"
                print(f"round {round_index + 1}/{args.rounds} {method:6s} {tool:13s} {status} "
                      f"(rss {record['peak_rss_mb']:.0f} MB, wall {record.get('wall_s', 0):.0f}s)", flush=True)
        if not args.no_write:  # after every round: an interrupted run keeps the rounds it finished
            write_report(args, context, runs, tools, methods, skipped, round_index + 1, started, load_start)

    rows = summarize(runs, tools, methods, skipped)
    print()
    print(table(rows))
    print(summary_line(rows))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
