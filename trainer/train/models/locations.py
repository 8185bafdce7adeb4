"""Where a model lives and how it becomes loadable: builtin, local, `s3://` and hub locations, and
LoRA outputs merged into their base (`kubetune export`, and a pipeline stage that starts from a
LoRA stage's output).

The base is reloaded in full precision (never the 4-bit copy used for QLoRA training), so a merge
is exact; the training spec saved beside the adapter restores what the adapter alone does not
carry (RoPE scaling, extended vocabulary). Loading weights for training is `loader.py`'s job.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec, TrainingSpec
from kubetune.trainer.api.specfile import REFERENCE_SCHEME
from kubetune.trainer.artifacts.adapters import adapter_base
from kubetune.trainer.artifacts.output import RESOLVED_SPEC_FILE
from kubetune.trainer.train.models.builtin import is_builtin, resolve_builtin

log = logging.getLogger(__name__)


def resolve_location(location: str, storage: StorageSpec, field: str) -> str:
    """A local path for builtin, local and S3 locations; hub ids are returned unchanged."""
    if location.startswith(REFERENCE_SCHEME):
        raise SpecError(field, f"comes from another job's output ({location[len(REFERENCE_SCHEME):]}), which only the operator resolves.",
                        "to run it here, pass that job's output location: --set model.path=outputs/NAME (or its s3:// URI).")
    if is_builtin(location):
        return str(resolve_builtin(location, field))
    if location.startswith("s3://"):
        from kubetune.trainer.artifacts import localize

        return str(localize(location, storage, field=field))
    path = Path(location).expanduser()
    if path.exists():
        return str(path)
    if location.startswith((".", "/", "~")) or location.count("/") > 1:
        raise SpecError(field, f"{location!r} does not exist.", "point it at a model directory, an s3:// URI or a hub id.")
    return location  # a hub id such as `meta-llama/Llama-3.2-1B`


def resolve_model_location(location: str, storage: StorageSpec, field: str) -> str:
    """Like `resolve_location`, but a LoRA output directory (the previous stage of a pipeline, or
    an AlignmentJob's `baseModelFrom` a LoRA FineTuneJob) becomes its adapter merged into its base:
    the next stage trains (and, for DPO/PPO, refers to) the model the previous stage produced.
    The merge is cached by the adapter's content, so ranks and retries share one copy."""
    resolved = resolve_location(location, storage, field)
    adapter_dir = Path(resolved)
    if not (adapter_dir / "adapter_config.json").is_file():
        return resolved
    return str(merged_adapter(adapter_dir, storage))


def merged_adapter(adapter_dir: Path, storage: StorageSpec) -> Path:
    import hashlib
    import os
    import shutil
    import tempfile

    from kubetune.trainer.artifacts.cache import cache_root, mark_used
    from kubetune.trainer.artifacts.hashing import file_hexdigest

    digest = hashlib.sha256()
    for file in sorted(p for p in adapter_dir.iterdir() if p.is_file()):
        digest.update(f"{file.name}:{file_hexdigest(file)}\n".encode())  # streamed, not read whole
    target = cache_root(storage) / "merged" / digest.hexdigest()[:24]
    if (target / "config.json").is_file():
        mark_used(target)  # for `kubetune storage gc`'s least-recently-used order
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".merging-", dir=target.parent))
    try:
        export_merged(str(adapter_dir), str(scratch / "model"), storage=storage)
        try:
            os.replace(scratch / "model", target)  # atomic: a reader never sees half a model
        except OSError:
            if not (target / "config.json").is_file():  # not another rank's finished copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("merged the adapter %s into its base for this stage (%s)", adapter_dir, target)
    return target


def load_config(spec: TrainingSpec, location: str):
    """The model config with spec-driven changes (RoPE scaling) applied before weights load."""
    from transformers import AutoConfig

    from kubetune.trainer.train.models.rope import apply_rope_scaling

    try:
        config = AutoConfig.from_pretrained(location, revision=spec.model.revision, trust_remote_code=spec.model.trustRemoteCode)
    except (OSError, ValueError) as exc:
        raise SpecError("model.path", f"no model config could be loaded from {location!r} ({_first_line(exc)}).",
                        "check the path or hub id, and that the hub is reachable (HF_HUB_OFFLINE).") from None
    return apply_rope_scaling(config, spec)


def export_merged(adapter: str, out: str, *, base: str | None = None, dtype: str = "float32",
                  max_shard_size: str = "2GB", storage: StorageSpec | None = None) -> str:
    """Merge `adapter` (a LoRA output dir) into its base; write the model and its tokenizer (a
    vision-language model's whole processor) to `out`, in the hub's layout that vLLM loads."""
    from peft import PeftModel

    from kubetune.trainer.train.models.hub_layout import write_hub_layout

    storage = storage or StorageSpec()
    adapter_dir = Path(resolve_location(adapter, storage, "adapter"))
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SpecError("adapter", f"{str(adapter_dir)!r} holds no adapter_config.json.", "pass a LoRA output directory.")
    saved_base, spec = adapter_base(adapter_dir)
    spec_file = adapter_dir / RESOLVED_SPEC_FILE
    base_location = resolve_model_location(base or saved_base, storage, "--base")
    model, tokenizer_or_processor = _base_and_tokenizer(base_location, spec, adapter_dir, dtype)
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError) as exc:
        raise SpecError("adapter", f"does not fit the base model {base_location!r} ({str(exc).splitlines()[0]}).",
                        "pass the base it was trained on with --base.") from None
    target_is_s3 = out.startswith("s3://")
    local_out = Path(tempfile.mkdtemp(prefix="kubetune-export-")) if target_is_s3 else Path(out)
    merged.save_pretrained(local_out, max_shard_size=max_shard_size)
    write_hub_layout(local_out)  # what vLLM loads
    tokenizer_or_processor.save_pretrained(local_out)
    if spec_file.is_file():
        shutil.copy(spec_file, local_out / RESOLVED_SPEC_FILE)
    if target_is_s3:
        from kubetune.trainer.artifacts.transfer import upload_directory

        upload_directory(local_out, out, storage)
        shutil.rmtree(local_out, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter, base_location, out)
    return out


def _base_and_tokenizer(base_location: str, spec: TrainingSpec | None, adapter_dir: Path, dtype: str):
    """The base model, in full precision, and what was saved beside the adapter to read its text.

    A vision-language base (its config has a `vision_config`) loads with its image-text-to-text
    class, whole (tower and projector: the adapter may carry trained copies of either), and keeps
    its processor: a merged VLM without `preprocessor_config.json` serves no picture and cannot
    start the next stage of a pipeline. A text model loads as a causal LM with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    try:
        config = load_config(spec, base_location) if spec else AutoConfig.from_pretrained(base_location)
    except (OSError, ValueError) as exc:
        raise SpecError("--base", f"no model config could be loaded from {base_location!r} ({_first_line(exc)}).",
                        "pass the base model the adapter was trained on with --base.") from None
    if getattr(config, "vision_config", None) is not None:  # models.vision.is_vision_config (it imports this module)
        from transformers import AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(base_location, config=config, dtype=getattr(torch, dtype))
        saved = any((adapter_dir / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
        processor = AutoProcessor.from_pretrained(adapter_dir if saved else base_location)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(base_location, config=config, dtype=getattr(torch, dtype))
        processor = tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    return model, processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
