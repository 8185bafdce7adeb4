"""DeepSpeed ZeRO-2 and ZeRO-3 under torchrun on CPU: two processes, one world.

With DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`), accelerate used to record a world of one
in every process (see `distributed.prepare_deepspeed_world`): both processes trained side by side
as rank 0. These runs prove the two ranks now train as one world: one `start` record with world
size 2, every logged step once, epochs that advance twice as fast as one process would, every
rank's ZeRO files in the checkpoint, evaluation (a gather across ranks) working, and a model that
loads and runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from .conftest import REPO
from .test_train import read_metrics, small_spec

pytestmark = pytest.mark.slow

BATCH = 4
STEPS = 4


def torchrun(spec_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "--no-python", str(Path(sys.executable).parent / "kubetune"), "train", str(spec_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    )


def zero_files(stage: int, step: int, rank: int) -> set[str]:
    """The files DeepSpeed writes for one rank into checkpoint-<step>."""
    folder = f"global_step{step}"
    files = {f"{folder}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng_state_{rank}.pth"}
    if stage == 3:  # the parameters are partitioned too
        files.add(f"{folder}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    return files


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_under_torchrun_trains_two_processes_as_one_world(tmp_path, tiny_model_dir, stage):
    spec = small_spec(tmp_path, train={"maxSteps": STEPS, "batchSize": BATCH, "evalEverySteps": 2},
                      checkpoint={"everySteps": STEPS}, distributed={"deepspeed": {"stage": stage}},
                      logging={"everySteps": 1, "samples": 0})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = torchrun(spec_path, nproc=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]  # torchrun: every process exited 0
    out = Path(spec["output"]["path"])
    records = read_metrics(out)

    # One world of two: one writer, one record per step, and each step consumes two batches.
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["worldSize"] == 2, starts
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)), losses
    steps_per_epoch = -(-starts[0]["data"]["train"]["examples"] // (BATCH * 2))
    assert losses[-1]["epoch"] == pytest.approx(STEPS / steps_per_epoch, abs=1e-3), (losses[-1], steps_per_epoch)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == BATCH and state["max_steps"] == STEPS

    # Evaluation (a gather across both ranks) works under DeepSpeed on CPU: the baseline at step 0
    # (run inside train(), once the engine exists), then at the scheduled steps.
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert evals == [0, 2, 4], records

    # Every rank's ZeRO files are in the checkpoint, which is marked complete.
    checkpoint = out / f"checkpoint-{STEPS}"
    assert (checkpoint / "kubetune-manifest.json").is_file()
    for rank in (0, 1):
        for name in zero_files(stage, STEPS, rank):
            assert (checkpoint / name).is_file(), name
    assert json.loads((out / "status.json").read_text())["phase"] == "Succeeded"

    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Loadable, complete (ZeRO-3 gathers the partitioned weights on save) and actually trained.
    assert trained.state_dict().keys() == base.state_dict().keys()
    weight = "model.layers.0.mlp.up_proj.weight"
    assert trained.state_dict()[weight].shape == base.state_dict()[weight].shape
    assert not torch.equal(trained.state_dict()[weight], base.state_dict()[weight])
    with torch.no_grad():
        assert torch.isfinite(trained(torch.tensor([[1, 2, 3]])).logits).all()
