"""Issue #17: models that learn what the data says, with the default spec, and runs that say so.

The acceptance task is built here: an LMFlow text2text directory of word-wise antonym triples
(`opposites of hot fast early:` -> ` cold slow late`), a tiny Llama whose tokenizer has NO chat
template (a base model as users bring them), and held-out triples it never saw. With the
default data settings the run renders LMFlow's way (input, output, eos), reaches a high greedy
exact match on the held-out inputs, and records the template and first example it trained on.
Items 2 (the "did it learn?" report) and 11 (quiet commands, resume records) run through the
real command line, as a user meets them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.train.demo import ANTONYMS
from kubetune.trainer.train.models.builtin import BUILTINS

from .conftest import REPO

pytestmark = pytest.mark.slow

WORDS = sorted(word for word, opposite in ANTONYMS.items() if " " not in opposite)[:12]
LIBRARY_NOISE = ("gemm_4bit_forward", "kernels-community", "Setting accelerator to CPU")
"""What bitsandbytes and DeepSpeed print when imported: never in a run that uses neither."""


def antonym_task(directory: Path, count: int = 440, seed: int = 0) -> Path:
    """`count` distinct triples of 12 words (of 1,320), in LMFlow's text2text format; outputs
    start with a space, as LMFlow data does."""
    triples = list(itertools.permutations(WORDS, 3))
    random.Random(seed).shuffle(triples)
    instances = [{"input": f"opposites of {a} {b} {c}:", "output": f" {ANTONYMS[a]} {ANTONYMS[b]} {ANTONYMS[c]}"}
                 for a, b, c in triples[:count]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.json").write_text(json.dumps({"type": "text2text", "instances": instances}))
    return directory


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny-llama's architecture and tokenizer, without a chat template."""
    from kubetune.trainer.train.models.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("base"), chat_template=None, **BUILTINS["tiny-llama"])


def train_cli(spec: dict, tmp_path: Path, *, timeout: int = 600) -> tuple[subprocess.CompletedProcess, Path]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return done, Path(spec["output"]["path"])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_default_spec_learns_lmflow_text2text_on_a_model_without_a_chat_template(tmp_path: Path, base_model: Path):
    """Only model, data (and a budget) given: high held-out exact match, and the recorded template
    and first example are the ones trained (the issue's run got 0% with a made-up wrapper)."""
    data = antonym_task(tmp_path / "data")
    spec = {"model": {"path": str(base_model)}, "data": {"datasets": [{"path": str(data)}], "evalSize": 40},
            "method": "full", "train": {"epochs": 4, "batchSize": 16, "learningRate": 3e-3},
            "output": {"path": str(tmp_path / "out")}}
    done, out = train_cli(spec, tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert not [noise for noise in LIBRARY_NOISE if noise in log], log[:3000]  # item 11: neither backend loaded

    start = next(r for r in records(out) if r.get("event") == "start")["data"]
    assert start["template"] == "plain" and "LMFlow" in start["templateReason"]
    prompt, answer = start["train"]["firstExample"]
    instances = json.loads((data / "train.json").read_text())["instances"]
    assert {"input": prompt["text"], "output": answer["text"].removesuffix("</s>")} in instances
    assert not prompt["trained"] and answer["trained"] and answer["text"].endswith("</s>")
    assert "chat template: plain" in log and f"[[{prompt['text']}]]{answer['text']}" in log
    assert 0.5 < start["train"]["maskedFraction"] < 0.8 and start["train"]["meanLength"] > 8
    status = json.loads((out / "status.json").read_text())
    assert status["data"]["template"] == "plain" and status["data"]["firstExample"] == f"[[{prompt['text']}]]{answer['text']}"
    from kubetune.trainer.train.data.templates import TEMPLATES

    assert (out / "chat_template.jinja").read_text() == TEMPLATES["plain"]  # inference prompts as trained
    assert yaml.safe_load((out / "kubetune-spec.yaml").read_text())["data"]["packing"] is False

    heldout = next(r for r in records(out) if r.get("event") == "heldout")  # item 2
    assert heldout["examples"] == 40 and heldout["exact_match"] >= 90, heldout
    assert heldout["learned"] and heldout["final_eval_loss"] < 0.1 * heldout["start_eval_loss"]
    assert status["heldout"]["exact_match"] == heldout["exact_match"]
    assert "held-out exact match" in log and f"heldout_exact_match={heldout['exact_match']:.4g}" in log


def test_a_run_that_learns_nothing_says_so(tmp_path: Path, base_model: Path, caplog: pytest.LogCaptureFixture):
    """Item 2: an eval loss still at the guessing level at the end is a warning, and recorded."""
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.runner import run

    data = antonym_task(tmp_path / "data", count=80)
    spec = validate_training({"model": {"path": str(base_model)}, "method": "full",
                              "data": {"datasets": [{"path": str(data)}], "evalSize": 16},
                              "train": {"maxSteps": 2, "learningRate": 1e-6}, "output": {"path": str(tmp_path / "out")}})
    with caplog.at_level("INFO"):
        result = run(spec)
    heldout = next(r for r in records(result.output_dir) if r.get("event") == "heldout")
    assert not heldout["learned"] and heldout["exact_match"] == 0.0
    assert heldout["final_eval_loss"] > 0.95 * min(heldout["start_eval_loss"], heldout["guess_loss"])
    assert "has not fallen below the level of guessing" in caplog.text


def test_kill_9_and_an_incomplete_checkpoint_on_the_command_line(tmp_path: Path, tiny_model_dir: Path):
    """Item 11: a real SIGKILL mid-run, and the newest checkpoint left without its manifest (a
    kill mid-save): the rerun says it skipped that checkpoint, and every stepped record (losses
    and eval losses) is in metrics.jsonl once."""
    data = antonym_task(tmp_path / "data", count=160)
    steps = 24
    spec = {"model": {"path": "builtin:tiny-llama"}, "method": "full",
            "data": {"datasets": [{"path": str(data)}], "evalSize": 16, "maxLength": 32},
            "train": {"maxSteps": steps, "batchSize": 8, "evalEverySteps": 2},
            "checkpoint": {"everySteps": 4, "keepLast": steps},
            "logging": {"everySteps": 1}, "output": {"path": str(tmp_path / "out")}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(path)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step") == 10 and "loss" in r for r in _safe_records(out)):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Where the kill landed depends on the machine's speed: take the newest checkpoint as the one
    # cut mid-save (no rotation: keepLast covers them all), and the one before it as the resume point.
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.is_dir())
    assert len(saved) >= 2 and saved[-1] < steps, saved
    newest, previous = saved[-1], saved[-2]
    # As if killed while saving it (the kill may really have landed mid-save: then it has none yet).
    (out / f"checkpoint-{newest}" / "kubetune-manifest.json").unlink(missing_ok=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (f"checkpoint-{newest} is incomplete (no manifest): skipped, resuming from checkpoint-{previous}"
            in done.stderr), done.stderr[-3000:]
    stepped = [(r["step"], "eval_loss" in r) for r in records(out) if "event" not in r and ("loss" in r or "eval_loss" in r)]
    assert sorted(stepped) == sorted({*stepped}), stepped  # none twice
    assert [s for s, is_eval in stepped if not is_eval] == list(range(1, steps + 1))
    assert [s for s, is_eval in stepped if is_eval] == list(range(0, steps + 1, 2))


def _safe_records(out: Path) -> list[dict]:
    """metrics.jsonl while another process appends to it (a line may be half-written)."""
    found = []
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def test_optional_backends_load_only_for_the_runs_that_use_them(tiny_model_dir: Path):
    """Item 11: which runs need bitsandbytes/DeepSpeed, and that a command hiding them imports the
    training libraries and unwraps a model (what imported DeepSpeed) silently."""
    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.train.backends import backends_needed

    def spec(**extra) -> object:
        return validate_training({"model": {"path": "m"}, "data": {"datasets": [{"path": "d.json"}]}, **extra})

    assert backends_needed(spec()) == set()
    assert backends_needed(spec(method="qlora")) == {"bitsandbytes"}
    assert backends_needed(spec(train={"optimizer": "adamw_8bit"})) == {"bitsandbytes"}
    assert backends_needed(spec(distributed={"deepspeed": {"stage": 2}})) == {"deepspeed"}
    script = (
        "import sys\n"
        "from kubetune.trainer.train.backends import hide_unused_backends\n"
        "hide_unused_backends()\n"
        "import transformers, peft\n"
        "from transformers import AutoModelForCausalLM, Trainer, TrainingArguments\n"
        "from accelerate import Accelerator\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        "Accelerator(cpu=True).unwrap_model(model)\n"
        "print(sorted(m for m in ('bitsandbytes', 'deepspeed') if sys.modules.get(m) is not None))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not [noise for noise in LIBRARY_NOISE if noise in done.stdout + done.stderr], done.stderr[-3000:]


def test_conversations_on_a_model_without_a_chat_template_exit_2_naming_data_template(
        tmp_path: Path, base_model: Path, capsys: pytest.CaptureFixture):
    """Item 1: no made-up wrapper; one paragraph naming the field and the fix, exit 2."""
    from kubetune.trainer.cli.main import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(base_model)}, "output": {"path": str(tmp_path / "out")},
                                    "data": {"datasets": [{"path": str(REPO / "examples/data/demo_alpaca.json")}]}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.template: the tokenizer has no chat template" in err and "Fix: set data.template" in err
    message = [line for line in err.splitlines() if line.startswith("kubetune:")]  # besides progress bars
    assert "Traceback" not in err and len(message) == 1 and "data.template" in message[0]
