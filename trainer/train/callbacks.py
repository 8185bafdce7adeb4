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
import uuid
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.trainer.artifacts import OutputSession
from kubetune.trainer.artifacts.output import checkpoint_files
from kubetune.trainer.train.distributed import world_info

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

    A resumed run appends to the same file, so the curve covers the whole job; the runner first
    rewinds it to the copy saved with the checkpoint it resumes from (`OutputSession.rewind_run_logs`),
    so the steps trained again are not logged twice. Throughput is the tokens counted by
    `TokenCounter` between two log records, times the world size.
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
        if not logs:
            return
        if "eval_loss" in logs or "eval_reward" in logs:  # rollout stages evaluate by reward
            # On every rank: the runner decides from this whether to run a final evaluation, a
            # collective that all ranks must enter together (a rank-0-only record would leave the
            # other ranks evaluating alone, waiting forever in its gather).
            self.last_eval = {k: v for k, v in logs.items() if k.startswith("eval_")}
            self.last_eval_step = state.global_step
        if not state.is_world_process_zero:
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
        self.write(record)


class TrainingComplete(Exception):
    """Raised by `StepBudget`: the resumed checkpoint is at (or past) the last step."""

    def __init__(self, step: int, max_steps: int):
        super().__init__(f"step {step} of {max_steps}: nothing left to train")
        self.step = step
        self.max_steps = max_steps


class StepBudget(TrainerCallback):
    """Stops a resumed run that has no step left, before it trains one.

    transformers checks for the end of training only after a step, so resuming from a checkpoint
    at `max_steps` trained one step more: a rerun after a kill during the final evaluation or
    upload saved checkpoint-N+1 and changed the final weights, and every rerun of a finished run
    (a retried job, a gang restart) added a step. At train begin the checkpoint (weights,
    optimizer, state) is loaded and nothing is trained yet: raising here leaves the model exactly
    at the checkpoint, for the runner to finish the run from. It must come before the callbacks
    that report a start (status, metrics).
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingComplete(state.global_step, state.max_steps)


def evaluated_at(state: TrainerState, step: int) -> bool:
    """Whether an evaluation was logged at `step`, by this process or by the attempt that saved
    the checkpoint it resumed from (log_history travels with the checkpoint, on every rank alike,
    so all ranks agree on skipping the final evaluation, a collective)."""
    return any(
        entry.get("step") == step and ("eval_loss" in entry or "eval_reward" in entry) for entry in state.log_history
    )


class CheckpointRecorder(TrainerCallback):
    """Marks each checkpoint complete (manifest written last) once every rank has saved it.

    Under torchrun a checkpoint may be spread over several disks: with ZeRO each rank writes its
    own optimizer-state shard (and every rank its RNG state) onto its node's disk. After all
    ranks have saved, one process per node lists its node's files; each file is assigned to the
    first node (in rank order) that has it, so a disk shared by several nodes is uploaded once.
    Rank 0 then finishes the checkpoint, expecting the other nodes' files under a token of this
    save; those nodes hand theirs over (`OutputSession.checkpoint_shards_saved`), and, as rank 0's
    session rotates checkpoints (`checkpoint.keepLast`) only on its own disk, the S3 session then
    rotates that node's own uploaded checkpoint directories.
    """

    def __init__(self, session: OutputSession, resumed_from: Path | None = None):
        self.session = session
        self.last_checkpoint: Path | None = resumed_from
        self.hands_over_shards = False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        owned, token = self._share_out(path, args.world_size)
        rank = world_info()[0]
        if state.is_world_process_zero:
            if path.is_dir():
                others = sorted(r for r, files in owned.items() if r != rank and files)
                self.session.checkpoint_saved(path, state.global_step, shards_from=others, token=token)
                self.last_checkpoint = path
        elif owned.get(rank):
            self.session.checkpoint_shards_saved(path, state.global_step, owned[rank], rank=rank, token=token)
            self.hands_over_shards = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.hands_over_shards:
            # This node's files must be stored before it exits (a graceful stop ends here too):
            # without them rank 0 cannot complete the checkpoint.
            self.session.wait_shards()

    @staticmethod
    def _share_out(path: Path, world_size: int) -> tuple[dict[int, list[str]], str | None]:
        """({rank: files it uploads}, this save's token), agreed by all ranks; ({}, None) alone."""
        import torch.distributed as dist

        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return {}, None
        dist.barrier()  # every rank's files (ZeRO optimizer states, RNG states) are on disk
        rank, local_rank, _ = world_info()
        listing = node_files(path) if local_rank == 0 else None
        token = uuid.uuid4().hex if rank == 0 else None
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (listing, token))
        return assign_files([entry[0] for entry in gathered]), gathered[0][1]


def node_files(checkpoint: Path) -> list[str]:
    """The checkpoint files on this node's disk, relative to the checkpoint directory."""
    if not checkpoint.is_dir():
        return []
    return [file.relative_to(checkpoint).as_posix() for file in checkpoint_files(checkpoint)]


def assign_files(listings: list[list[str] | None]) -> dict[int, list[str]]:
    """Each file to the lowest rank that listed it (listings indexed by rank; None: not a node's
    lister). Rank 0's node keeps everything it has; others upload only what it lacks."""
    taken: set[str] = set()
    owned: dict[int, list[str]] = {}
    for rank, files in enumerate(listings):
        if files is None:
            continue
        owned[rank] = [f for f in files if f not in taken]
        taken.update(files)
    return owned


class StatusReporter(TrainerCallback):
    """Keeps status.json current (phase, step, loss, tokens/s, ETA) for the operator to read."""

    def __init__(self, session: OutputSession, metrics: MetricsWriter, checkpoints: CheckpointRecorder, every_seconds: float = 10.0,
                 data: dict[str, Any] | None = None):
        self.session = session
        self.data = data
        """What the run trains on (template, token statistics, first example): shown with every status."""
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
        if self.data:
            status["data"] = self.data
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
