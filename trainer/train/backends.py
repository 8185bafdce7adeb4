"""Optional heavy backends (bitsandbytes, DeepSpeed) load only in runs that use them.

transformers imports peft, which imports bitsandbytes whenever it is installed, and accelerate
imports DeepSpeed whenever it is installed (to unwrap a model). Both announce themselves on import
(bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community ..."; DeepSpeed: an
accelerator warning), so every command printed them, used or not, and a user took them for a
problem of the run. `hide_unused_backends` marks the backends a command does not need as absent
before those libraries load (`sys.modules[name] = None`: an import raises ImportError, which peft
expects, and availability checks answer False); a run that needs one keeps it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

OPTIONAL_BACKENDS = ("bitsandbytes", "deepspeed")


def backends_needed(spec: Any) -> set[str]:
    """The optional backends a training spec (every step of a pipeline) uses: bitsandbytes for
    `method: qlora` and 8-bit/paged optimizers, DeepSpeed for `distributed.deepspeed`."""
    needed: set[str] = set()
    for step in spec.pipeline_specs() if spec.pipeline else [spec]:
        optimizer = step.train.optimizer.lower()
        if step.method == "qlora" or any(word in optimizer for word in ("bnb", "8bit", "paged")):
            needed.add("bitsandbytes")
        if step.distributed.deepspeed is not None:
            needed.add("deepspeed")
    return needed


def hide_unused_backends(needed: Iterable[str] = ()) -> list[str]:
    """Mark the optional backends not in `needed` as absent for this process; returns them. Only
    for a process's own command line (the `kubetune` entry point): a library user or a test
    process may need them later. One already imported is left alone."""
    hidden = [name for name in OPTIONAL_BACKENDS if name not in needed and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden
