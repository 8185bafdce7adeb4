"""The process's place in a distributed run, and the DeepSpeed config built from the spec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.trainer.errors import SpecError
from kubetune.trainer.spec import DeepSpeedSpec


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment (0, 0, 1 standalone)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def deepspeed_config(ds: DeepSpeedSpec) -> dict[str, Any]:
    """A ZeRO config whose batch/precision/clipping values are `auto`, so transformers fills them
    from TrainingArguments and the two can never disagree."""
    if ds.config:
        path = Path(ds.config)
        if not path.is_file():
            raise SpecError("distributed.deepspeed.config", f"{ds.config!r} does not exist.", "point it at a DeepSpeed JSON file.")
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise SpecError("distributed.deepspeed.config", f"is not valid JSON ({exc}).") from None
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds.stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto", reduce_bucket_size="auto")
    if ds.offloadOptimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offloadParams:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
