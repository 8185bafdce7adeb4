"""The process's place in a distributed run, and the DeepSpeed config built from the spec.

DeepSpeed on CPU (`DS_ACCELERATOR=cpu`, gloo) under torchrun needs one correction that the
libraries do not make: see `prepare_deepspeed_world`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DeepSpeedSpec

log = logging.getLogger(__name__)

CPU_BACKEND = "gloo"
"""The process-group backend on CPU, for DDP and DeepSpeed alike (DeepSpeed's CPU accelerator
would pick oneCCL when installed; gloo is always there and is what DDP on CPU uses)."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def prepare_deepspeed_world(timeout_s: int) -> bool:
    """Set up accelerate's process state for DeepSpeed on CPU across several processes.

    Returns True when it did (the caller then passes `accelerator_config={"use_configured_state":
    True}` to TrainingArguments), False when nothing is needed (one process, or CUDA).

    Why: for a DeepSpeed run, transformers' `TrainingArguments._setup_devices` builds
    accelerate's `PartialState` without a backend (it only forwards `ddp_backend` outside the
    DeepSpeed branch). On a GPU, accelerate then picks NCCL; on CPU it finds no device backend,
    so although DeepSpeed's own `init_distributed` joins the real (world size N) process group,
    accelerate records `backend=None`, hence `num_processes=1`, `process_index=0` in every process:
    each rank believes it is rank 0 of a world of one: each iterates over all the data, and all
    of them write the outputs (racing on status.json), while ZeRO partitions over the real group.
    The `use_cpu` route is no way out: accelerate then goes MULTI_CPU and drops DeepSpeed.
    Building the `PartialState` here, through the same DeepSpeed path but with the gloo backend
    named, gives accelerate the real world; transformers (and every TRL config derived from the
    arguments, see `keep_configured_state`) then reuses it.
    """
    world_size = world_info()[2]
    if world_size <= 1 or cuda_available():
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState._shared_state
    if state and (state.get("distributed_type") != DistributedType.DEEPSPEED or state.get("num_processes") != world_size):
        # A state built earlier in this process without the backend (e.g. an earlier
        # TrainingArguments): start over, the way transformers itself resets it.
        AcceleratorState._reset_state(reset_partial_state=True)
    if not PartialState._shared_state:
        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what transformers sets for this call
        try:
            PartialState(backend=CPU_BACKEND, timeout=timedelta(seconds=timeout_s))
        finally:
            if previous is None:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    built = PartialState()
    if built.num_processes != world_size or built.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"DeepSpeed on CPU: accelerate built a world of {built.num_processes} ({built.distributed_type}) "
            f"where torchrun started {world_size} processes."
        )
    log.debug("DeepSpeed on CPU: rank %d of %d (%s)", built.process_index, world_size, CPU_BACKEND)
    return True


def keep_configured_state(args: Any) -> Any:
    """Re-arm `use_configured_state` on TrainingArguments after they were built.

    transformers pops the flag out of `accelerator_config` while setting up devices; a TRL config
    built later from these arguments (DPO, reward modelling) would then reset accelerate's state
    and fall back to a world of one. Keeping the flag makes it reuse the prepared state too.
    """
    args.accelerator_config.use_configured_state = True
    return args


def agree(value: Any) -> Any:
    """Rank 0's `value`, on every rank (as is outside a process group).

    For decisions only rank 0 can make (it alone reads the run's status.json, which on a
    multi-node run with a local output only its disk holds) that every rank must follow: a rank
    that went on training alone would wait forever in its first collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
