"""TrainerCallbacks that turn a transformers training loop into a kubetune run.

Each has one job: metrics JSONL, status.json, checkpoint completion markers, and a graceful stop
on SIGTERM (preemption, node drain, Ctrl-C) that saves a checkpoint before exiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.trainer.storage import OutputSession

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

RENAMES = {"learning_rate": "lr", "train_loss": "train_loss_mean"}


class TokenCounter:
    """Wraps a data collator to count the non-padding tokens this rank trains on.

    Counting in the collator costs nothing, where transformers' own counter all-gathers a tensor
    every step (and breaks under DeepSpeed on CPU). Batches are built just ahead of the step that
    uses them, which is close enough for a throughput figure.
    """

    def __init__(self, collate):
        self.collate = collate
        self.tokens = 0

    def __call__(self, rows):
        batch = self.collate(rows)
        mask = batch.get("attention_mask")
        if mask is not None:
            self.tokens += int(mask.sum())
        elif "input_ids" in batch:
            self.tokens += int(batch["input_ids"].numel())
        return batch


class MetricsWriter(TrainerCallback):
    """Appends every log record (loss, lr, grad norm, tokens/s, eval loss) to metrics.jsonl.

    A resumed run appends to the same file, so the curve covers the whole job. Throughput is
    the tokens counted by `TokenCounter` between two log records, times the world size.
    """

    def __init__(self, output_dir: Path, counter: TokenCounter | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.counter = counter
        self._last_tokens: int | None = None
        self._last_time: float | None = None
        self.tokens_per_second: float | None = None
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _tokens(self) -> int:
        return self.counter.tokens if self.counter else 0

    def on_train_begin(self, args, state: TrainerState, control, **kwargs):
        self._last_tokens = self._tokens()
        self._last_time = time.perf_counter()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
        for key, value in logs.items():
            record[RENAMES.get(key, key)] = value
        if "loss" in logs:
            now, tokens = time.perf_counter(), self._tokens()
            if self._last_time is not None and self._last_tokens is not None and now > self._last_time:
                # Tokens counted on this rank; multiply by world size for the job's throughput.
                rate = (tokens - self._last_tokens) * args.world_size / (now - self._last_time)
                record["tokens_per_second"] = round(rate, 1)
                self.tokens_per_second = rate
            self._last_time, self._last_tokens = now, tokens
            self.last_loss = logs["loss"]
        if "eval_loss" in logs:
            self.last_eval = {k: v for k, v in logs.items() if k.startswith("eval_")}
            self.last_eval_step = state.global_step
        self.write(record)


class CheckpointRecorder(TrainerCallback):
    """Marks each checkpoint complete (manifest written last) once the trainer has saved it."""

    def __init__(self, session: OutputSession):
        self.session = session
        self.last_checkpoint: Path | None = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's shards (ZeRO optimizer states) are on disk before the manifest
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                self.session.checkpoint_saved(path, state.global_step)
                self.last_checkpoint = path


class StatusReporter(TrainerCallback):
    """Keeps status.json current (phase, step, loss, tokens/s, ETA) for the operator to read."""

    def __init__(self, session: OutputSession, metrics: MetricsWriter, checkpoints: CheckpointRecorder, every_seconds: float = 10.0):
        self.session = session
        self.metrics = metrics
        self.checkpoints = checkpoints
        self.every_seconds = every_seconds
        self._last_write = 0.0
        self._start_step = 0
        self._start_time = time.time()

    def snapshot(self, state: TrainerState, phase: str = "Running", **extra: Any) -> dict[str, Any]:
        total = state.max_steps or None
        eta = None
        done = state.global_step - self._start_step
        if total and done > 0:
            eta = (time.time() - self._start_time) / done * (total - state.global_step)
        status = {
            "phase": phase,
            "step": state.global_step,
            "totalSteps": total,
            "epoch": state.epoch,
            "loss": self.metrics.last_loss,
            "tokensPerSecond": self.metrics.tokens_per_second,
            "etaSeconds": round(eta, 1) if eta is not None else None,
            "lastCheckpoint": str(self.checkpoints.last_checkpoint) if self.checkpoints.last_checkpoint else None,
            "updatedAt": time.time(),
        }
        status.update(extra)
        return status

    def on_train_begin(self, args, state: TrainerState, control, **kwargs):
        self._start_step, self._start_time = state.global_step, time.time()
        if state.is_world_process_zero:
            self.session.write_status(self.snapshot(state))

    def on_log(self, args, state: TrainerState, control, logs=None, **kwargs):
        if state.is_world_process_zero and time.time() - self._last_write >= self.every_seconds:
            self._last_write = time.time()
            self.session.write_status(self.snapshot(state))

    def on_save(self, args, state: TrainerState, control, **kwargs):
        if state.is_world_process_zero:
            self.session.write_status(self.snapshot(state))


class GracefulStop(TrainerCallback):
    """On SIGTERM/SIGINT: finish the current step, save a checkpoint, stop.

    Under torchrun every rank gets the signal, but not necessarily before the same step; the
    flag is all-reduced each step so all ranks save and stop together (a rank that stopped
    alone would leave the others waiting in a collective).
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test server)
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name)
        self.requested = True

    def _agreed(self, args: TrainingArguments) -> bool:
        if args.world_size <= 1:
            return self.requested
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._agreed(args):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
