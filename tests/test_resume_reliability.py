"""Hardening issue #15, items 6, 7 and 11: reruns, rotation and run logs across kills.

- a rerun of a finished run changes nothing; a run killed after its last checkpoint is finished
  from it without training a step more (transformers alone trained one past `maxSteps`);
- `checkpoint.keepLast: 1` never leaves the run without a complete checkpoint, even when killed
  between transformers' save and kubetune's manifest, locally and with an S3 output;
- after a kill, the rerun's steps are in `metrics.jsonl` once, and none before it is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.artifacts import output as output_module
from kubetune.trainer.artifacts.output import MANIFEST_NAME, read_manifest
from kubetune.trainer.artifacts.s3output import S3OutputSession
from kubetune.trainer.train import runner
from kubetune.trainer.train.runner import run
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

from .conftest import REPO
from .test_train import read_metrics, small_spec

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def loss_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def eval_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "eval_loss" in r]


def killed_at(step: int):
    """A stand-in for write_manifest that dies (like a kill) on the manifest of `step`."""
    real = output_module.write_manifest

    def write_manifest(checkpoint: Path, at: int):
        if at == step:
            raise RuntimeError(f"killed before the manifest of step {at}")
        return real(checkpoint, at)

    return write_manifest


def test_rerun_of_a_finished_run_is_a_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = validate_training(small_spec(tmp_path, train={"evalEverySteps": 3}))
    out = run(spec).output_dir
    before = {p.name: sha256(p) for p in out.iterdir() if p.is_file()}
    checkpoints = checkpoint_steps(out)
    assert checkpoints == [3, 6]

    def must_not_load(*_: object) -> None:
        raise AssertionError("a finished single-process run loads no model or data")

    monkeypatch.setattr("kubetune.trainer.train.runner._load_inputs", must_not_load)
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = run(spec)
    assert result.global_step == 6 and not result.interrupted
    assert "already finished at step 6 (status.json says Succeeded): nothing to do" in caplog.text
    assert checkpoint_steps(out) == checkpoints  # no checkpoint-7
    assert {p.name: sha256(p) for p in out.iterdir() if p.is_file()} == before  # weights, metrics, status untouched
    assert json.loads((out / "status.json").read_text())["phase"] == "Succeeded"


def test_rerun_of_a_finished_run_on_the_command_line_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kubetune.trainer.cli.main import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(tmp_path, train={"maxSteps": 3}, data={"evalSize": 0})))
    out = tmp_path / "out"
    assert main(["train", str(spec_path)]) == 0
    weights, metrics = sha256(out / "model.safetensors"), sha256(out / "metrics.jsonl")
    capsys.readouterr()
    assert main(["train", str(spec_path)]) == 0
    assert "Done: 3 steps" in capsys.readouterr().out
    assert sha256(out / "model.safetensors") == weights and sha256(out / "metrics.jsonl") == metrics
    assert checkpoint_steps(out) == [3]


def test_killed_after_the_last_checkpoint_finishes_without_training_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed in the final save (checkpoint-6 complete, no final model, no Succeeded status):
    the rerun finishes from checkpoint-6, and its final weights are an uninterrupted run's."""
    reference = run(validate_training(small_spec(tmp_path / "ref", train={"evalEverySteps": 3}))).output_dir
    spec = validate_training(small_spec(tmp_path / "killed", train={"evalEverySteps": 3}))

    def killed(*args, **kwargs):
        raise RuntimeError("killed during the final save")

    monkeypatch.setattr(runner, "save_final", killed)
    with pytest.raises(RuntimeError, match="final save"):
        run(spec)
    out = Path(spec.output_path)
    assert read_manifest(out / "checkpoint-6") is not None and not (out / "model.safetensors").exists()
    assert json.loads((out / "status.json").read_text())["phase"] == "Failed"

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = run(spec)
    assert "is at step 6, the last (6): nothing left to train" in caplog.text
    assert result.global_step == 6
    assert checkpoint_steps(out) == [3, 6]  # no checkpoint-7
    assert sha256(out / "model.safetensors") == sha256(reference / "model.safetensors")
    records = read_metrics(out)
    assert max(r.get("step", 0) for r in records) == 6
    assert loss_steps(records) == loss_steps(read_metrics(reference)) == list(range(1, 7))
    assert eval_steps(records) == eval_steps(read_metrics(reference)) == [0, 3, 6]  # step 6 not evaluated twice
    assert [r["step"] for r in records if r.get("event") == "end"] == [6]
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["step"] == 6


def test_keep_last_1_keeps_the_previous_checkpoint_until_the_next_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = validate_training(small_spec(tmp_path, checkpoint={"everySteps": 3, "keepLast": 1}, data={"evalSize": 0}))
    out = Path(spec.output_path)
    monkeypatch.setattr(output_module, "write_manifest", killed_at(6))
    with pytest.raises(RuntimeError, match="killed before the manifest"):
        run(spec)
    assert read_manifest(out / "checkpoint-3") is not None, "the only complete checkpoint was deleted"
    assert not (out / "checkpoint-6" / MANIFEST_NAME).exists()
    assert loss_steps(read_metrics(out)) == list(range(1, 7))  # the killed attempt logged 4..6

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = run(spec)
    assert "checkpoint-6 is incomplete (no manifest): skipped, resuming from checkpoint-3" in caplog.text
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-3")
    assert result.global_step == 6
    assert checkpoint_steps(out) == [6]  # rotated once checkpoint-6 was complete
    records = read_metrics(out)
    assert loss_steps(records) == list(range(1, 7))  # 4..6 once, though trained twice
    assert [r["resumedFrom"] for r in records if r.get("event") == "start"][-1].endswith("checkpoint-3")


KILL_AT_STEP_7 = """
import os, sys
from kubetune.trainer.train import callbacks
from kubetune.trainer.cli.main import main

write = callbacks.MetricsWriter.write

def write_then_die(self, record):
    write(self, record)
    if record.get("step") == 7 and "loss" in record:
        os._exit(137)  # kill -9: no cleanup, no finally

callbacks.MetricsWriter.write = write_then_die
sys.exit(main(["train", sys.argv[1]]))
"""


def test_after_kill_9_each_step_is_in_the_metrics_once(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, train={"maxSteps": 10}, checkpoint={"everySteps": 5}, data={"evalSize": 0})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = Path(spec["output"]["path"])
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_7, str(spec_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == 137, (killed.stdout + killed.stderr)[-3000:]
    assert loss_steps(read_metrics(out)) == list(range(1, 8))
    assert checkpoint_steps(out) == [5]

    result = run(validate_training(spec))
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-5")
    records = read_metrics(out)
    assert loss_steps(records) == list(range(1, 11))  # 6 and 7 once, none before lost
    assert [r["step"] for r in records if r.get("event") == "end"] == [10]


def test_keep_last_1_with_an_s3_output_keeps_the_local_checkpoint(
    s3: S3Env, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The staging disk of an S3 output (a PVC) resumes from its own copy, without downloading it."""
    document = small_spec(tmp_path, checkpoint={"everySteps": 3, "keepLast": 1}, data={"evalSize": 0})
    document.update(model={"path": str(tiny_model_dir)}, output={"path": s3.uri("runs/k1")},
                    storage={"endpointUrl": s3.proxy.url, "pathStyle": True, "cacheDir": str(s3.cache)})
    spec = validate_training(document)
    real = S3OutputSession.checkpoint_saved

    def killed(self, path, step, **kwargs):
        if step == 6:
            raise RuntimeError("killed before the manifest of step 6")
        return real(self, path, step, **kwargs)

    monkeypatch.setattr(S3OutputSession, "checkpoint_saved", killed)
    with pytest.raises(RuntimeError, match="killed before the manifest"):
        run(spec)
    staging = next((s3.cache / "outputs").glob("k1-*"))
    assert read_manifest(staging / "checkpoint-3") is not None, "the only complete local checkpoint was deleted"
    assert s3.keys(f"runs/k1/checkpoint-3/{MANIFEST_NAME}")

    monkeypatch.undo()
    s3.proxy.reset()
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = run(spec)
    assert "checkpoint-6 is incomplete (no manifest): skipped, resuming from checkpoint-3" in caplog.text
    assert result.resumed_from == s3.uri("runs/k1/checkpoint-3")
    downloads = [r.path for r in s3.proxy.requests
                 if r.method == "GET" and "/runs/k1/checkpoint-3/" in r.path and not r.path.endswith(MANIFEST_NAME)]
    assert downloads == []  # resumed from the local copy (its manifest is read, its files are not)
    assert checkpoint_steps(staging) == [6]
    assert sorted({key.split("/")[2] for key in s3.keys("runs/k1/checkpoint-")}) == ["checkpoint-6"]
    records = [json.loads(line) for line in s3.get("runs/k1/metrics.jsonl").decode().splitlines()]
    assert loss_steps(records) == list(range(1, 7))
