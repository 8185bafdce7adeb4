"""The training entry point: spec in, trained model and metrics out.

This is what `kubetune train` runs on a laptop, under `torchrun`, and inside a FineTuneJob pod.
Everything device- or cluster-specific (precision, attention kernel, DDP backend, where the
output lives) is decided here from the spec and the environment, then handed to a stage
workflow (`kubetune.trainer.train.stages`).
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.artifacts.output import RESOLVED_SPEC_FILE
from kubetune.trainer.train.callbacks import (
    CheckpointRecorder,
    GracefulStop,
    MetricsWriter,
    StatusReporter,
    StepBudget,
    TokenCounter,
    TrainingComplete,
    evaluated_at,
)
from kubetune.trainer.train.distributed import world_info
from kubetune.trainer.train.result import RunResult

log = logging.getLogger(__name__)

LOSS_PLOT_FILE = "loss.png"
EXIT_INTERRUPTED = 143
"""Exit code after a graceful stop on SIGTERM (128 + 15): the job is retried and resumes."""


def configure_logging(level: str) -> None:
    import transformers

    rank = world_info()[0]
    logging.basicConfig(
        level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    # transformers' own info logs (every file it saves) drown ours; show them only when debugging.
    transformers.logging.set_verbosity(logging.DEBUG if level == "debug" and rank == 0 else logging.WARNING)
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()


def resolve_resume(spec: TrainingSpec, session) -> str | None:
    """The checkpoint to resume from, per `checkpoint.resume`."""
    resume = spec.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        removed = session.remove_incomplete_checkpoints()
        latest = session.latest_checkpoint()
        report_skipped(removed, latest)
        return str(latest) if latest else None
    if resume.startswith("s3://"):
        from kubetune.trainer.artifacts import localize

        path = localize(resume, spec.storage, field="checkpoint.resume")
    else:
        path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise SpecError("checkpoint.resume", f"{resume!r} is not a checkpoint directory (no trainer_state.json).",
                        "use auto, never, or the path of a checkpoint-N directory.")
    return str(path)


def report_skipped(removed: list, latest: Path | None) -> None:
    """Say which newer checkpoints a resume passed over (a run killed mid-save, mid-upload):
    otherwise a run silently resuming from an older step looks like lost progress."""
    from kubetune.trainer.artifacts.output import CHECKPOINT_RE

    latest_step = int(CHECKPOINT_RE.match(latest.name).group(1)) if latest and CHECKPOINT_RE.match(latest.name) else -1
    target = f"resuming from {latest.name}" if latest else "starting from the beginning"
    seen: set[str] = set()
    for item in removed:
        name = str(item).rstrip("/").rsplit("/", 1)[-1]
        match = CHECKPOINT_RE.match(name)
        if match and int(match.group(1)) > latest_step and name not in seen:
            seen.add(name)
            log.warning("%s is incomplete (no manifest): skipped, %s", name, target)


def finished_run(spec: TrainingSpec) -> dict | None:
    """The status of a finished run of this very spec in the output (rank 0), else None.

    Re-running the command of a finished run (a retried job, a gang restart, a second
    `kubetune train`) must change nothing. "This very spec": the resolved spec the run stored
    when it started is this one, so a raised `train.maxSteps` still continues training from the
    last checkpoint. Only with `checkpoint.resume: auto`: `never` asks to train afresh.
    """
    from kubetune.trainer.artifacts.output import read_output_file, read_status

    if spec.checkpoint.resume != "auto":
        return None
    status = read_status(spec.output_path, spec.storage)
    if not status or status.get("phase") != "Succeeded":
        return None
    stored = read_output_file(spec.output_path, RESOLVED_SPEC_FILE, spec.storage)
    try:
        document = yaml.safe_load(stored) if stored is not None else None
    except yaml.YAMLError:
        return None
    current = yaml.safe_load(yaml.safe_dump(spec.to_document(), sort_keys=False))
    return status if document == current else None


def default_scheduler(stage: str) -> str:
    """`train.scheduler` when unset: linear (transformers' and TRL's default) for `pt` and `sft`,
    where cosine at the same peak rate cost held-out exact match on the demo task
    (bench/quality.py, #17); cosine, which the preference and RL stages were tuned with, otherwise."""
    return "linear" if stage in ("pt", "sft") else "cosine"


def build_training_args(spec: TrainingSpec, output_dir: Path, precision: str, has_eval: bool):
    """TrainingArguments from the spec, with the process-group setup this machine needs.

    On CPU with several processes the backend is gloo, for DDP and DeepSpeed alike; DeepSpeed on
    CPU also needs accelerate's state prepared first (`prepare_deepspeed_world` says why), or
    every process trains alone as rank 0 of a world of one.
    """
    from transformers import TrainingArguments

    from kubetune.trainer.train.data.lengths import sampling_settings
    from kubetune.trainer.train.distributed import (
        CPU_BACKEND,
        cuda_available,
        deepspeed_config,
        keep_configured_state,
        prepare_deepspeed_world,
    )
    from kubetune.trainer.train.models.methods import optimizer_settings

    t = spec.train
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.evalEverySteps else "epoch"
    warmup: float = t.warmupSteps if t.warmupSteps else t.warmupRatio
    world_size = world_info()[2]
    ddp_timeout = 1800  # transformers' default, made explicit: the prepared DeepSpeed state uses it too
    configured = bool(spec.distributed.deepspeed) and prepare_deepspeed_world(ddp_timeout)
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.maxSteps or -1,
        per_device_train_batch_size=t.batchSize,
        per_device_eval_batch_size=t.batchSize,
        gradient_accumulation_steps=t.gradientAccumulation,
        learning_rate=t.learningRate,
        lr_scheduler_type=t.scheduler or default_scheduler(spec.stage),
        warmup_steps=warmup,
        weight_decay=t.weightDecay,
        max_grad_norm=t.maxGradNorm,
        **optimizer_settings(spec),
        **sampling_settings(spec),
        deepspeed=deepspeed_config(spec.distributed.deepspeed) if spec.distributed.deepspeed else None,
        accelerator_config={"use_configured_state": True} if configured else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Applied by the method, which knows about adapters. transformers 5's name: TRL's configs
        # default the old `gradient_checkpointing` to True, which warns unless this one is set.
        activation_checkpointing=False,
        eval_strategy=eval_strategy,
        eval_steps=t.evalEverySteps,
        save_strategy="steps",
        save_steps=spec.checkpoint.everySteps,
        # Not `save_total_limit`: transformers would delete the previous checkpoint before the new
        # one is complete. The output session rotates (`checkpoint.keepLast`) once it is.
        save_total_limit=None,
        logging_steps=spec.logging.everySteps,
        logging_first_step=True,
        report_to=spec.logging.reportTo or "none",
        remove_unused_columns=False,
        ddp_backend=None if cuda_available() or world_size == 1 else CPU_BACKEND,
        ddp_find_unused_parameters=False if world_size > 1 else None,
        ddp_timeout=ddp_timeout,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda_available(),
        disable_tqdm=world_info()[0] != 0,
        run_name=spec.name,
    )
    return keep_configured_state(args) if configured else args


def with_trainable_embeddings(spec: TrainingSpec, model) -> TrainingSpec:
    """With adapters, new token rows must train and be saved: add the embedding and output
    head to `lora.modulesToSave` (a no-op for full/freeze, where the rows train anyway)."""
    if not spec.uses_lora:
        return spec
    names = set(spec.lora.modulesToSave)
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    for name, module in model.named_modules():
        if any(module is w for w in wanted if w is not None):
            names.add(name.split(".")[-1])
    return spec.model_copy(update={"lora": spec.lora.model_copy(update={"modulesToSave": sorted(names)})})


def save_final(trainer, spec: TrainingSpec, tokenizer, output_dir: Path) -> None:
    """Final model (or adapter) with its tokenizer in the output root (the resolved spec is
    already there: rank 0 writes it when the run starts)."""
    unwrapped = getattr(trainer.model, "get_base_model", lambda: trainer.model)()
    unwrapped.config.use_cache = True  # the saved model is for inference
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(output_dir))
    if not spec.uses_lora:
        from kubetune.trainer.train.models.hub_layout import write_hub_layout

        write_hub_layout(output_dir)  # a model built or loaded in transformers' own layout: vLLM reads the hub's
    if spec.uses_lora and spec.output.mergeAdapter:
        from kubetune.trainer.train.models.locations import export_merged

        export_merged(str(output_dir), str(output_dir / "merged"), storage=spec.storage)


def final_evaluation(spec: TrainingSpec, output_dir: Path) -> dict:
    """`spec.eval`: evaluate the saved model the way `kubetune eval` would."""
    from kubetune.trainer.eval import run_evaluation

    assert spec.eval is not None
    datasets = spec.eval.datasets or spec.data.evalDatasets or spec.data.datasets
    report = run_evaluation(str(output_dir), list(datasets), tasks=list(spec.eval.tasks), max_samples=spec.eval.maxSamples,
                            max_new_tokens=spec.eval.maxNewTokens, output_dir=output_dir / "eval", storage=spec.storage)
    log.info("final evaluation:\n%s", report.to_markdown())
    return report.to_dict()


def public_location(spec: TrainingSpec, local_path: str | None) -> str | None:
    """A checkpoint's location as the user knows it: under the output URI, not the local cache."""
    if local_path is None:
        return None
    if spec.output_path.startswith("s3://"):
        return f"{spec.output_path.rstrip('/')}/{Path(local_path).name}"
    return local_path


def run(spec: TrainingSpec) -> RunResult:
    """Train according to `spec`. Returns after saving; raises KubetuneError on bad input.

    Whatever fails, from a wrong model URI to a crash mid-training, rank 0 leaves a Failed
    status.json with the reason (the operator shows it) and lets queued uploads finish.
    """
    from kubetune.trainer.artifacts import open_output

    if spec.pipeline:
        from kubetune.trainer.train.workflow import run_pipeline

        return run_pipeline(spec, run)
    started = time.time()
    configure_logging(spec.logging.level)
    rank = world_info()[0]
    session = open_output(spec.output_path, spec.storage, keep_last=spec.checkpoint.keepLast)
    progress: dict = {}
    try:
        return _train(spec, session, started, progress)
    except BaseException as exc:
        if rank == 0:
            message = f"{type(exc).__name__}: {exc}"[:500]
            if "status" in progress:
                failed = progress["status"].snapshot(progress["trainer"].state, phase="Failed", message=message)
            else:
                failed = {"phase": "Failed", "message": message, "updatedAt": time.time()}
            session.write_status(failed, force=True)
        raise
    finally:
        # Every rank: waits for queued checkpoint uploads (what a retry resumes from), rank 0's
        # and the other nodes' own checkpoint files alike; a no-op where nothing was queued.
        session.close()


def _train(spec: TrainingSpec, session, started: float, progress: dict) -> RunResult:
    import transformers

    from kubetune.trainer.train.distributed import agree
    from kubetune.trainer.train.models.loader import pick_precision
    from kubetune.trainer.train.samples import sample_prompts
    from kubetune.trainer.train.stages import stage_for

    rank = world_info()[0]
    transformers.set_seed(spec.train.seed)
    precision = pick_precision(spec.train.precision)
    output_dir = session.local_dir
    stage = stage_for(spec)
    # Optional stage hooks: `preflight(spec) -> spec` checks what only the stage knows about
    # (reward functions import, reward/reference models exist) before anything is loaded;
    # `load_model(spec, precision, tokenizer)` replaces the causal-LM loader (reward models);
    # `sample_prompts(eval_rows, count)` finds prompts in the stage's own eval rows; a vision-language
    # model's workflow also replaces the tokenizer, data, collator, method and held-out check hooks.
    if hasattr(stage, "preflight"):
        spec = stage.preflight(spec)

    # One process: a finished run is found before the model is loaded. Several: after the process
    # group exists (below), since every rank must follow rank 0's answer.
    finished = finished_run(spec) if world_info()[2] == 1 else None
    if finished is None:
        spec, tokenizer, data, model = _load_inputs(spec, stage, precision)
        args = build_training_args(spec, output_dir, precision, has_eval=data.eval is not None)
        world_size = args.world_size  # sets up the process group, which `agree` needs
        finished = agree(finished_run(spec) if rank == 0 else None)
    if finished is not None:
        log.info("the run in %s already finished at step %s (status.json says Succeeded): nothing to do",
                 spec.output_path, finished.get("step"))
        return RunResult(output_dir, int(finished.get("step") or 0), runtime_seconds=time.time() - started)
    # One process per node cleans up and downloads the checkpoint; the others then find it local.
    with args.main_process_first(local=True, desc="resolving the checkpoint to resume from"):
        resume_from = resolve_resume(spec, session)
    trainer, metrics, status, stop = _wire_trainer(spec, stage, model, tokenizer, data, args, session, resume_from)
    progress.update(status=status, trainer=trainer)
    resumed = public_location(spec, resume_from)
    if rank == 0:
        # A killed attempt may have logged steps this run trains again: continue from the logs as
        # they were at the checkpoint, so that every record is there once.
        session.rewind_run_logs(Path(resume_from) if resume_from else None)
        (output_dir / RESOLVED_SPEC_FILE).write_text(yaml.safe_dump(spec.to_document(), sort_keys=False))
        metrics.write({"event": "start", "time": time.time(), "resumedFrom": resumed, "precision": precision,
                       "worldSize": world_size, "batching": batching_of(spec), "kernels": kernels_of(trainer, model),
                       "data": data.stats})
    # Generating on one rank needs the whole model there: not so with ZeRO-partitioned weights.
    find_prompts = getattr(stage, "sample_prompts", sample_prompts)
    prompts = find_prompts(data.eval, spec.logging.samples) if rank == 0 and spec.distributed.deepspeed is None else []
    _fit(trainer, spec, data, stop, resume_from, resumed, prompts, tokenizer, output_dir)

    state = trainer.state
    if stop.requested:
        # The checkpoint was saved by the trainer on the way out; make sure it is durable.
        if rank == 0:
            session.write_status(status.snapshot(state, phase="Interrupted"), force=True)
            session.finalize()
        return RunResult(output_dir, state.global_step, interrupted=True, resumed_from=resumed,
                         runtime_seconds=time.time() - started)
    _finish(trainer, spec, session, data, metrics, status, tokenizer, prompts, stage)
    return RunResult(output_dir, state.global_step, resumed_from=resumed, eval_metrics=metrics.last_eval,
                     runtime_seconds=time.time() - started)


def _wire_trainer(spec: TrainingSpec, stage, model, tokenizer, data, args, session, resume_from: str | None):
    """The stage's trainer with kubetune's callbacks (step budget, metrics, checkpoint markers,
    status.json, graceful stop), its collator and optimizer; returns (trainer, metrics, status, stop)."""
    from kubetune.trainer.train.context import RunContext
    from kubetune.trainer.train.data import make_collator
    from kubetune.trainer.train.models.methods import loraplus_optimizer
    from kubetune.trainer.train.models.moe import RouterAuxLoss, router_aux_enabled

    # Under DeepSpeed the baseline evaluation runs inside `train()`, once the engine exists: before
    # it, ZeRO-0/1/2 have no engine to evaluate with and ZeRO-3 leaves transformers with a stale
    # one (transformers PR #44889). A resumed run has its baseline already.
    args.eval_on_start = data.eval is not None and spec.distributed.deepspeed is not None and resume_from is None
    optimizers = (loraplus_optimizer(model, spec, args), None) if spec.uses_lora and spec.lora.loraplusRatio else (None, None)
    flash = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    collator = stage.make_collator(tokenizer, spec) if hasattr(stage, "make_collator") else make_collator(tokenizer, spec, flatten_packed=flash)
    counter = TokenCounter(collator)
    metrics = MetricsWriter(session.local_dir, counter)
    checkpoints = CheckpointRecorder(session, resumed_from=Path(resume_from) if resume_from else None)
    status = StatusReporter(session, metrics, checkpoints, data=data_summary(data.stats))
    stop = GracefulStop()
    # An MoE model's router loss joins each log record before the metrics writer sees it.
    router = [RouterAuxLoss(model)] if router_aux_enabled(model) else []
    ctx = RunContext(spec=spec, model=model, tokenizer=tokenizer, data=data, training_args=args,
                     callbacks=[StepBudget(), *router, metrics, checkpoints, status, stop], optimizers=optimizers,
                     data_collator=counter)
    return stage.build_trainer(ctx), metrics, status, stop


def kernels_of(trainer, model) -> dict:
    """The fast paths this run took, for the start record: attention implementation, Liger's fused
    kernels, and whether the loss computed logits at labelled positions only."""
    return {"attention": getattr(model.config, "_attn_implementation", None),
            "liger": bool(getattr(model, "kubetune_liger", False)),
            "logitsOnLabels": bool(getattr(trainer, "labelled_logits_only", False))}


def with_lengths(spec: TrainingSpec, data):
    """The data bundle with a `length` column where batches are grouped by length (`data.lengths`)."""
    from kubetune.trainer.train.data.lengths import length_grouped, with_length_column

    if length_grouped(spec):
        data.train, data.eval = with_length_column(data.train), with_length_column(data.eval)
    return data


def batching_of(spec: TrainingSpec) -> str:
    """How batches are built, for the start record and the log."""
    from kubetune.trainer.train.data.lengths import length_grouped

    grouped = ", grouped by length (seeded mega-batches)" if length_grouped(spec) else ""
    if spec.stage not in ("pt", "sft"):
        return f"the stage's own (TRL's collator){grouped}"
    if spec.padding_free_enabled:
        return "padding-free (examples concatenated, positions restart per example)"
    why = "data.paddingFree: false" if spec.data.paddingFree is False else "a remote-code model: set data.paddingFree to try"
    return f"{'packed rows, ' if spec.packing_enabled else ''}padded{grouped} ({why})"


def data_summary(stats: dict) -> dict:
    """The part of the data stats status.json shows: how examples are rendered and how much of
    them is trained on, the first one with its masked tokens in [[...]]."""
    from kubetune.trainer.train.data.pipeline import show_example

    train = stats.get("train") or {}
    summary = {"template": stats.get("template"), "templateReason": stats.get("templateReason"),
               **{k: train[k] for k in ("examples", "meanLength", "maskedFraction") if k in train}}
    if train.get("firstExample"):
        summary["firstExample"] = show_example(train["firstExample"])[:500]
    return summary


def _load_inputs(spec: TrainingSpec, stage, precision: str):
    """(spec, tokenizer, data, model) ready to train. Inputs first: a wrong model or data
    location fails before any checkpoint is downloaded."""
    from kubetune.trainer.train.data import build_datasets
    from kubetune.trainer.train.models.loader import load_model, load_tokenizer
    from kubetune.trainer.train.models.methods import apply_method
    from kubetune.trainer.train.models.vocab import extend_tokenizer, resize_embeddings

    tokenizer = stage.load_tokenizer(spec) if hasattr(stage, "load_tokenizer") else load_tokenizer(spec.model, spec.storage)
    added_tokens = extend_tokenizer(spec, tokenizer) if spec.vocab.enabled else []
    build = getattr(stage, "build_datasets", build_datasets)
    data = with_lengths(spec, build(spec, tokenizer))
    model = stage.load_model(spec, precision, tokenizer) if hasattr(stage, "load_model") else load_model(spec, precision)
    if added_tokens:
        resize_embeddings(model, len(tokenizer), spec.vocab.noiseStd, spec.train.seed)
        spec = with_trainable_embeddings(spec, model)
    model = getattr(stage, "apply_method", apply_method)(model, spec)
    # A KV cache is useless in training and, when present, transformers skips the packed-sequence
    # detection that keeps packed examples from attending to each other.
    model.config.use_cache = False
    return spec, tokenizer, data, model


def _fit(trainer, spec: TrainingSpec, data, stop: GracefulStop, resume_from: str | None, resumed: str | None,
         prompts: list, tokenizer, output_dir: Path) -> None:
    """The baseline (a fresh run), then training, with the graceful stop installed. A resumed
    checkpoint with no step left (`StepBudget`) trains nothing: the run is finished from it."""
    from kubetune.trainer.train.samples import SAMPLES_FILE, generate_samples, record_samples

    stop.install()
    try:
        if resume_from is None:
            if data.eval is not None and spec.distributed.deepspeed is None:
                trainer.evaluate()  # the baseline every later eval loss is compared against
            record_samples(output_dir / SAMPLES_FILE, "before", 0, generate_samples(trainer.model, tokenizer, prompts))
        # The objects alive now (torch, transformers, the model: millions, and they live as long
        # as the run) leave the cyclic collector's view for the training loop: the full
        # collection Trainer.train starts with (accelerate's free_memory) and the automatic
        # ones during the loop then scan only what the loop allocates (0.27 of 2.0 s of
        # bench/throughput.py's LoRA run was that first collection). vLLM freezes its heap the
        # same way after loading a model.
        gc.freeze()
        trainer.train(resume_from_checkpoint=resume_from)
    except TrainingComplete as done:
        log.info("%s is at step %d, the last (%d): nothing left to train; finishing the run from it",
                 resumed, done.step, done.max_steps)
    finally:
        gc.unfreeze()
        stop.uninstall()


def _finish(trainer, spec: TrainingSpec, session, data, metrics: MetricsWriter, status: StatusReporter,
            tokenizer, prompts: list, stage) -> None:
    """Final evaluation, model, samples, metrics, plot and Succeeded status; then every rank waits."""
    import torch

    from kubetune.trainer.train.heldout import learning_check
    from kubetune.trainer.train.plots import plot_loss
    from kubetune.trainer.train.samples import SAMPLES_FILE, generate_samples, record_samples

    rank = world_info()[0]
    state = trainer.state
    output_dir = session.local_dir
    if data.eval is not None and metrics.last_eval_step != state.global_step and not evaluated_at(state, state.global_step):
        trainer.evaluate()  # the final model's eval loss, unless the schedule just ran it
    save_final(trainer, spec, tokenizer, output_dir)
    if rank == 0:
        record_samples(output_dir / SAMPLES_FILE, "after", state.global_step, generate_samples(trainer.model, tokenizer, prompts))
        heldout = None
        if spec.stage in ("pt", "sft"):  # a per-token loss, comparable with guessing; answers to reproduce
            check = getattr(stage, "learning_check", learning_check)
            vocab_size = trainer.model.config.get_text_config().vocab_size  # a vision-language model's is its LM's
            heldout = check(trainer.model, tokenizer, data.eval, metrics.path, vocab_size=vocab_size,
                            generate=spec.distributed.deepspeed is None)  # ZeRO shards the weights
        if heldout is not None:
            metrics.write({**heldout, "step": state.global_step})
            if "exact_match" in heldout:
                metrics.last_eval["heldout_exact_match"] = heldout["exact_match"]
        if spec.eval is not None:
            metrics.write({"event": "eval", "step": state.global_step, **final_evaluation(spec, output_dir)})
        metrics.write({"event": "end", "step": state.global_step, "time": time.time()})
        plot_loss(metrics.path, output_dir / LOSS_PLOT_FILE, title=spec.name or "")
        session.write_status(status.snapshot(state, phase="Succeeded", outputUri=spec.output_path,
                                             **({"heldout": heldout} if heldout else {})))
        session.finalize()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
