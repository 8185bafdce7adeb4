"""`kubetune export`: merge a LoRA/QLoRA adapter into its base and write a standalone model.

The base is reloaded in full precision (never the 4-bit copy used for QLoRA training), so the
merge is exact; the training spec saved beside the adapter restores what the adapter alone
does not carry (RoPE scaling, extended vocabulary).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.train.runner import RESOLVED_SPEC_FILE

log = logging.getLogger(__name__)


def export_merged(adapter: str, out: str, *, base: str | None = None, dtype: str = "float32",
                  max_shard_size: str = "2GB", storage: StorageSpec | None = None) -> str:
    """Merge `adapter` (a LoRA output dir) into its base; write the model and tokenizer to `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.serve.loading import adapter_base
    from kubetune.trainer.train.models.loader import load_config, resolve_location, resolve_model_location

    storage = storage or StorageSpec()
    adapter_dir = Path(resolve_location(adapter, storage, "adapter"))
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SpecError("adapter", f"{str(adapter_dir)!r} holds no adapter_config.json.", "pass a LoRA output directory.")
    saved_base, spec = adapter_base(adapter_dir)
    spec_file = adapter_dir / RESOLVED_SPEC_FILE
    base_location = resolve_model_location(base or saved_base, storage, "--base")
    config = load_config(spec, base_location) if spec else None
    model = AutoModelForCausalLM.from_pretrained(base_location, config=config, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError) as exc:
        raise SpecError("adapter", f"does not fit the base model {base_location!r} ({str(exc).splitlines()[0]}).",
                        "pass the base it was trained on with --base.") from None
    target_is_s3 = out.startswith("s3://")
    local_out = Path(tempfile.mkdtemp(prefix="kubetune-export-")) if target_is_s3 else Path(out)
    merged.save_pretrained(local_out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(local_out)
    if spec_file.is_file():
        shutil.copy(spec_file, local_out / RESOLVED_SPEC_FILE)
    if target_is_s3:
        from kubetune.trainer.artifacts.transfer import upload_directory

        upload_directory(local_out, out, storage)
        shutil.rmtree(local_out, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter, base_location, out)
    return out
