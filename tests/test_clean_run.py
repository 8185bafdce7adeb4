"""A clean run prints no warnings about things it does not use: `kubetune train` with the
default settings of each common method writes no Python warning to its log (transformers'
deprecated `gradient_checkpointing` argument, PEFT's own noise on LoRA and on mixture-of-experts
adapters were all printed on every run before)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
WARNING_LINE = re.compile(r"^\S*:\d+: \w*Warning: ", re.MULTILINE)
"""How Python's warnings module prints a warning (`file.py:123: FutureWarning: ...`)."""

RUNS = {
    "sft-lora": {"model": "builtin:tiny-llama", "method": "lora"},
    "sft-full": {"model": "builtin:tiny-llama", "method": "full"},
    "sft-lora-moe": {"model": "builtin:tiny-mixtral", "method": "lora"},
    "dpo-lora": {"model": "builtin:tiny-llama", "method": "lora", "stage": "dpo"},
}


def _spec(run: dict[str, str], out: Path) -> dict:
    stage = run.get("stage", "sft")
    data = ({"path": str(DATA / "demo_preferences.jsonl"), "format": "preference"} if stage == "dpo"
            else {"path": str(DATA / "demo_alpaca.json"), "format": "alpaca"})
    return {"name": "clean", "stage": stage, "model": {"path": run["model"]}, "method": run["method"],
            "data": {"datasets": [data], "maxLength": 64},
            "train": {"maxSteps": 3, "batchSize": 4}, "output": {"path": str(out)}}


@pytest.mark.slow  # a training process each (~10 s)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_default_run_prints_no_warning(name, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(RUNS[name], tmp_path / "out")))
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONWARNINGS", None)  # the filters a user's shell has: Python's defaults
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(spec)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Done: 3 steps" in log
    warnings = [line for line in log.splitlines() if WARNING_LINE.match(line)]
    assert not warnings, "\n".join(warnings)
