"""Checkpoints that are already quantized (GPTQ, AWQ, AQLM): LoRA adapters on the frozen
quantized base.

Such a checkpoint says so in its `config.json` (`quantization_config.quant_method`), and
transformers loads it through the method's own kernels; PEFT then wraps the quantized linear
layers with adapters (its `gptq`, `awq` and `aqlm` LoRA layers). What can go wrong is decided here,
before anything is loaded, with the field to change:

- the weights are integer codes: only adapters can train (`method: lora`); `qlora` would quantize
  an already quantized model, `full`/`freeze`/`galore` would train the codes;
- the kernels must be installed: GPTQ and AWQ load through `gptqmodel` (GPTQ also through
  `optimum`), which is built for CUDA and not installable on a CPU-only machine in reasonable time;
  AQLM through the small `aqlm` package, whose dequantizing kernels also run on a CPU (numba for
  256-entry codebooks, plain torch otherwise), so AQLM checkpoints are trained and tested here.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec

log = logging.getLogger(__name__)

KERNELS: dict[str, tuple[tuple[str, ...], bool]] = {
    # quant_method: (packages the kernels need, whether they run on a CPU-only machine here)
    "gptq": (("gptqmodel", "optimum"), False),
    "awq": (("gptqmodel",), False),
    "aqlm": (("aqlm",), True),
}
INSTALL = {"gptq": "pip install gptqmodel optimum", "awq": "pip install gptqmodel", "aqlm": "pip install 'kubetune[aqlm]'"}


def quant_method(config: Any) -> str | None:
    """The checkpoint's quantization method (`gptq`, `awq`, `aqlm`, ...) from its config, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def check_prequantized(spec: TrainingSpec, config: Any, location: str) -> str | None:
    """The checkpoint's method when it is GPTQ/AWQ/AQLM-quantized and can be trained here (LoRA,
    kernels installed, a GPU where the kernels need one); a SpecError otherwise. None for an
    unquantized checkpoint (or another method, left to transformers)."""
    method = quant_method(config)
    if method not in KERNELS:
        return None
    what = f"the checkpoint at {location!r} is already {method.upper()}-quantized (config.json quantization_config.quant_method: {method})"
    if spec.method != "lora":
        raise SpecError("method", f"{what}: its weights are integer codes, so only LoRA adapters on top of it can train, not method {spec.method}.",
                        "set method: lora (the quantized base stays frozen), or point model.path at the unquantized model.")
    packages, runs_on_cpu = KERNELS[method]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    from kubetune.trainer.train.distributed import cuda_available

    if not runs_on_cpu and not cuda_available():
        raise SpecError("model.path", f"{what}: its kernels ({' and '.join(packages)}) need a CUDA GPU, and this machine has none.",
                        f"run the job on a GPU node with the kernels installed ({INSTALL[method]}), or point model.path at the "
                        "unquantized model and use method: qlora (bitsandbytes quantizes it, on a CPU too).")
    if missing:
        raise SpecError("model.path", f"{what}: loading it needs {' and '.join(missing)}, which is not installed.",
                        f"{INSTALL[method]}, or point model.path at the unquantized model and use method: qlora.")
    log.info("pre-quantized %s checkpoint: LoRA adapters on the frozen quantized base", method.upper())
    return method


def quantized_linear_names(model) -> list[str]:
    """Names (last component) of the quantized linear layers, for `lora.targetModules: [all-linear]`:
    PEFT's `all-linear` finds `nn.Linear` layers only, and a quantized model's are not. A
    quantized linear layer is a leaf module with `in_features`/`out_features` that is not a plain
    `nn.Linear` (the output layer, kept unquantized, is left out as `all-linear` does)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if hasattr(module, "in_features") and hasattr(module, "out_features")
             and not isinstance(module, torch.nn.Linear) and not list(module.children())}
    return sorted(names)
