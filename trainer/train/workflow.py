"""Pipelines: several stages from one spec (`pipeline:`), e.g. the four-stage LMFlow workflow
sft -> rm -> ppo/raft, or sft -> dpo.

`TrainingSpec.pipeline_specs()` expands the steps into complete specs (each validated on its own,
each writing to `<output>/<step name>`, each starting from the previous step's output, rollout
stages scoring with the latest `rm` step). This module runs them in order.

A retried pipeline (a restarted pod, a second `kubetune train`) skips the steps whose output
already says Succeeded and resumes the interrupted one from its checkpoint, so no finished stage
is trained twice and nothing written is lost.

The pipeline's own output root gets a `status.json` too (rank 0): which step is running, and once
all have finished, Succeeded with `outputUri` = the last step's output. That is what the operator
reads for progress, and what a job referring to this one (`baseModelFrom`, an InferenceService's
`fromJob`) is given as the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.result import RunResult

log = logging.getLogger(__name__)

PIPELINE_STATUS = "pipeline.json"
"""Written to the pipeline's output root (rank 0): each step's name, stage, output and outcome."""


def step_succeeded(spec: TrainingSpec) -> bool:
    """Whether this step's output holds a finished run (its status.json says Succeeded)."""
    from kubetune.trainer.artifacts.output import read_status

    status = read_status(spec.output_path, spec.storage)
    return status is not None and status.get("phase") == "Succeeded"


def run_pipeline(spec: TrainingSpec, run: Callable[[TrainingSpec], RunResult]) -> RunResult:
    """Run every step with `run` (the runner's one-stage entry point, passed in so that the runner
    alone depends on this module); returns the last step's RunResult (interrupted if a step was)."""
    from kubetune.trainer.train.distributed import world_info

    started = time.time()
    steps = spec.pipeline_specs()
    rank = world_info()[0]
    record: list[dict] = []
    result: RunResult | None = None
    for index, step in enumerate(steps):
        entry = {"step": index, "name": step.name, "stage": step.stage, "output": step.output_path}
        if step_succeeded(step):
            log.info("pipeline step %d/%d (%s) already succeeded: %s", index + 1, len(steps), step.stage, step.output_path)
            record.append({**entry, "outcome": "skipped (already succeeded)"})
            continue
        log.info("pipeline step %d/%d: stage %s -> %s", index + 1, len(steps), step.stage, step.output_path)
        _write_root_status(spec, rank, {"phase": "Running", "message": f"pipeline step {index + 1}/{len(steps)}: {step.stage}",
                                        "pipelineStep": index, "pipelineSteps": len(steps), "stepOutputUri": step.output_path})
        try:
            result = run(step)
        except BaseException as exc:
            _write_root_status(spec, rank, {"phase": "Failed", "message": f"pipeline step {index + 1}/{len(steps)} ({step.stage}): "
                                            f"{type(exc).__name__}: {exc}"[:500], "pipelineStep": index, "pipelineSteps": len(steps)})
            raise
        record.append({**entry, "outcome": "interrupted" if result.interrupted else "succeeded", "steps": result.global_step})
        _write_record(spec, record, rank)
        if result.interrupted:
            _write_root_status(spec, rank, {"phase": "Interrupted", "pipelineStep": index, "pipelineSteps": len(steps)})
            return result
    _write_record(spec, record, rank)
    _write_root_status(spec, rank, {"phase": "Succeeded", "outputUri": steps[-1].output_path, "pipelineSteps": len(steps),
                                    "message": f"{len(steps)} pipeline steps succeeded"})
    if result is None:  # every step had finished before
        return RunResult(Path(steps[-1].output_path), 0, runtime_seconds=time.time() - started)
    result.runtime_seconds = time.time() - started
    return result


def _write_root_status(spec: TrainingSpec, rank: int, status: dict) -> None:
    """status.json at the pipeline's output root (see the module doc), written at step boundaries."""
    if rank != 0:
        return
    from kubetune.trainer.artifacts import open_output

    with open_output(spec.output_path, spec.storage) as session:
        session.write_status({**status, "updatedAt": time.time()}, force=True)


def _write_record(spec: TrainingSpec, record: list[dict], rank: int) -> None:
    if rank != 0 or spec.output_path.startswith("s3://"):
        return  # on S3 each step's own status.json is the record
    root = Path(spec.output_path)
    root.mkdir(parents=True, exist_ok=True)
    (root / PIPELINE_STATUS).write_text(json.dumps({"steps": record}, indent=2) + "\n")
