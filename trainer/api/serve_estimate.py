"""Per-GPU memory of serving a model: `kubetune estimate` on an InferenceService and the
operator's admission check for one.

vLLM reserves `gpuMemoryUtilization` (default 0.9) of each GPU, loads its shard of the weights
(tensor parallelism splits them over `tensorParallelSize` GPUs), profiles one forward pass of a
full scheduler batch to measure the activation peak, and gives what is left to the KV cache. It
refuses to start when that space cannot hold one sequence of `--max-model-len` tokens (default:
the model's own context length), which is what a Llama-3.1-8B with its 131,072-token context
does on a 24 GiB GPU: this module finds that failure at `kubectl apply` instead of in a
crash-looping pod, and says which `tensorParallelSize` or `maxModelLen` would start.

The arithmetic (pure: no torch, no file read, so the webhook runs it in microseconds):

- weights per GPU: every parameter (all experts of a mixture of experts, the vision encoder and
  projector of a vision-language model) times the load width (16-bit for `dtype: auto`, as vLLM
  loads fp32 checkpoints in 16-bit; 8 bits for fp8; about 4.25 for the 4-bit AWQ/GPTQ formats
  with their group scales), divided by the tensor-parallel size;
- KV cache per token and GPU: 2 (key and value) x layers x KV heads x head dim x 2 bytes, the KV
  heads split over the tensor-parallel ranks (replicated when there are fewer heads than ranks),
  as vLLM's own KV cache spec computes its page size;
- the activation peak of the profile run: the scheduler's token budget (8192 tokens) through one
  layer's widest tensors (residual stream, attention and the MLP's gate/up outputs) plus fp32
  logits for the sampled rows;
- a fixed overhead (CUDA context, NCCL and cuBLAS workspaces, CUDA graphs).

`engineArgs.extraArgs` reach vLLM as they are, and four of vLLM's own flags change these numbers:
`--kv-cache-dtype fp8` (one byte per KV element), `--max-num-batched-tokens` (the profile run's
token budget), `--max-num-seqs` (its sampled rows) and `--cpu-offload-gb` (weights kept in host
memory). `extra_args_settings` reads them, so an estimate matches the server the pod runs.

The estimate errs low on purpose (it is a refusal, not a promise): a service it refuses cannot
start; one it admits may still need a smaller `maxModelLen` when the estimate was close.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from kubetune.trainer.api.estimate import GIB, ModelShape, _human

DEFAULT_GPU_UTILIZATION = 0.9
"""vLLM's `--gpu-memory-utilization` default."""
PROFILE_TOKENS = 8192
"""Tokens in vLLM's profiling batch (its scheduler's per-step token budget for an API server)."""
SAMPLED_ROWS = 256
"""Rows of logits the profile run samples (vLLM's smallest `max_num_seqs` default)."""
SERVING_OVERHEAD_GIB = 1.0
"""CUDA context, NCCL/cuBLAS workspaces and CUDA graphs, per GPU."""
WEIGHT_BITS = {None: 16, "awq": 4.25, "gptq": 4.25, "awq_marlin": 4.25, "gptq_marlin": 4.25, "marlin": 4.25,
               "fp8": 8, "bitsandbytes": 4.5, "int8": 8, "w8a8": 8}
"""Bits per weight by `engineArgs.quantization`; a method not listed is not checked."""
DTYPE_BITS = {"auto": 16, "half": 16, "float16": 16, "bfloat16": 16, "float": 32, "float32": 32}
TP_CHOICES = (1, 2, 4, 8)
"""Tensor-parallel sizes suggested (one node's GPUs)."""


@dataclass
class ServingEstimate:
    """Bytes per GPU of one server replica, and how many tokens of KV cache are left."""

    shape: ModelShape
    tensor_parallel: int
    budget: float
    """What the engine may use of one GPU (its memory x gpuMemoryUtilization)."""
    components: dict[str, float]
    kv_bytes_per_token: float
    max_model_len: int
    """Tokens one sequence may hold (0: unknown; then only the weights are checked)."""
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """The `serving_estimate` keywords this estimate was made with (the suggestions vary one)."""

    @property
    def kv_space(self) -> float:
        return self.budget - sum(self.components.values())

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache that fit beside the weights (summed over concurrent sequences)."""
        return max(0, int(self.kv_space // self.kv_bytes_per_token)) if self.kv_bytes_per_token else 0

    @property
    def fits(self) -> bool:
        """The engine can start: the weights fit, and the KV cache holds one full-length sequence."""
        return self.kv_space > 0 and self.kv_tokens >= max(1, self.max_model_len)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.components.items())
        return f"{parts} GiB per GPU of {self.budget / GIB:.1f} usable"


def serving_estimate(shape: ModelShape, *, gpu_gib: float, tensor_parallel: int = 1, dtype: str = "auto",
                     quantization: str | None = None, max_model_len: int | None = None,
                     utilization: float | None = None, kv_cache_dtype: str = "auto",
                     batched_tokens: int = PROFILE_TOKENS, max_seqs: int = SAMPLED_ROWS,
                     cpu_offload_gib: float = 0.0) -> ServingEstimate | None:
    """The estimate for one replica on GPUs of `gpu_gib`, or None when the weights' width is
    unknown (a quantization method not in WEIGHT_BITS: no check rather than a wrong refusal)."""
    settings = {k: v for k, v in locals().items() if k != "shape"}
    bits = _weight_bits(dtype, quantization)
    if bits is None:
        return None
    tp = max(1, tensor_parallel)
    weights = max(0.0, held_parameters(shape) * bits / 8 / tp - cpu_offload_gib * GIB)
    components = {"weights": weights, "activations": _profile_activation_bytes(shape, tp, batched_tokens, max_seqs),
                  "overhead": SERVING_OVERHEAD_GIB * GIB}
    # A layout scaled to a bare parameter count guesses the KV heads: check the weights only.
    length = 0 if shape.params_override is not None else (max_model_len or shape.max_positions)
    kv_dtype = dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    return ServingEstimate(
        shape=shape, tensor_parallel=tp, budget=gpu_gib * GIB * (utilization or DEFAULT_GPU_UTILIZATION),
        components=components, kv_bytes_per_token=kv_bytes_per_token(shape, tp, kv_dtype), max_model_len=length,
        notes=_notes(shape, length) + _vllm_flag_notes(settings), settings=settings,
    )


def _vllm_flag_notes(settings: dict[str, Any]) -> list[str]:
    """What the vLLM flags read from extraArgs changed, so the breakdown explains itself."""
    changed = [f"{flag} {settings[key]}" for flag, (key, _) in EXTRA_ARG_SETTINGS.items()
               if settings[key] != serving_estimate.__kwdefaults__[key]]
    return [f"counted from engineArgs.extraArgs: {', '.join(changed)}"] if changed else []


EXTRA_ARG_SETTINGS = {"--kv-cache-dtype": ("kv_cache_dtype", str), "--max-num-batched-tokens": ("batched_tokens", int),
                      "--max-num-seqs": ("max_seqs", int), "--cpu-offload-gb": ("cpu_offload_gib", float)}
"""vLLM server flags that change the memory of one replica, and the estimate keyword each sets."""


def extra_args_settings(extra_args: list[str] | None) -> dict[str, Any]:
    """The `serving_estimate` keywords that vLLM arguments passed as they are set (`--flag value`,
    `--flag=value`, or one string holding both; the last one wins, as in vLLM's own parser). A
    value that is not a number where one is needed is skipped here: vLLM itself refuses it."""
    words = [word for arg in extra_args or [] for word in (shlex.split(arg) if " " in arg.strip() else [arg])]
    out: dict[str, Any] = {}
    for i, word in enumerate(words):
        flag, _, inline = word.partition("=")
        if flag.replace("_", "-") not in EXTRA_ARG_SETTINGS:
            continue
        value = inline or (words[i + 1] if i + 1 < len(words) else "")
        key, kind = EXTRA_ARG_SETTINGS[flag.replace("_", "-")]
        if not value or value.startswith("--"):
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            continue
    return out


def _weight_bits(dtype: str, quantization: str | None) -> float | None:
    if quantization:
        return WEIGHT_BITS.get(quantization.lower())
    return DTYPE_BITS.get(dtype, 16)


def held_parameters(shape: ModelShape) -> int:
    """Every parameter the server holds: the language model (all experts) and any vision tower."""
    return shape.parameters + shape.vision_params + shape.projector_params


def kv_bytes_per_token(shape: ModelShape, tensor_parallel: int = 1, dtype: str = "auto") -> float:
    """Key and value of every layer for one token on one GPU (vLLM's page size over its block
    size): the KV cache takes the model's dtype, 16-bit unless `dtype` asks for fp32, or one
    byte per element for an fp8 KV cache (`--kv-cache-dtype fp8`, `fp8_e4m3`, `fp8_e5m2`)."""
    heads_per_rank = max(1.0, shape.kv_heads / max(1, tensor_parallel))
    bits = 8 if dtype.startswith("fp8") else DTYPE_BITS.get(dtype, 16)
    return 2 * shape.layers * heads_per_rank * shape.head_dim * bits / 8


def _profile_activation_bytes(shape: ModelShape, tensor_parallel: int, tokens: int = PROFILE_TOKENS,
                              rows: int = SAMPLED_ROWS) -> float:
    """The profile run's activation peak: one layer's widest live tensors for the whole token
    budget in 16-bit (residual, normed input, attention output, gate+up and their product),
    plus fp32 logits (and their softmax) for the sampled rows."""
    tp = max(1, tensor_parallel)
    width = 3 * shape.hidden + (shape.heads * shape.head_dim) / tp + 3 * shape.intermediate * shape.active_experts / tp
    return tokens * width * 2 + 2 * min(rows, tokens) * shape.vocab * 4


def _notes(shape: ModelShape, length: int) -> list[str]:
    notes = []
    if shape.experts > 1:
        notes.append(f"mixture of experts: every expert is held ({_human(shape.parameters)} parameters), "
                     f"{_human(shape.active_parameters)} are active per token ({shape.active_experts} of "
                     f"{shape.experts} experts)")
    if shape.vision_hidden:
        notes.append(f"vision encoder {_human(shape.vision_params)} + projector {_human(shape.projector_params)} "
                     "parameters held beside the language model; each image's tokens take KV cache like text")
    if shape.params_override is not None:
        notes.append("the layout is scaled from a parameter count (modelParameters): only the weights were checked")
    elif not length:
        notes.append("the model's context length is unknown: only the weights were checked "
                     "(set engineArgs.maxModelLen to check the KV cache too)")
    return notes


def serving_fit_message(est: ServingEstimate, *, gpus: int, parallel: bool = True) -> str:
    """Why one replica cannot start and what would (for the admission refusal and the CLI)."""
    shape = est.shape
    where = f"{est.tensor_parallel} GPU(s) of {est.settings['gpu_gib']:g} GiB (tensorParallelSize {est.tensor_parallel})"
    if est.kv_space <= 0:
        text = (f"the weights alone do not fit: {est.summary()}, on {where} ({shape.name}, "
                f"{_human(held_parameters(shape))} parameters).")
    else:
        text = (f"the KV cache left beside the weights holds {est.kv_tokens:,} tokens, fewer than one sequence of "
                f"maxModelLen {est.max_model_len:,} ({est.summary()}, on {where}; {shape.name}).")
    options = serving_suggestions(est, gpus=gpus, parallel=parallel)
    if options:
        return text + " It would start with: " + "; or ".join(options) + "."
    tried = "tensorParallelSize up to 8, a shorter maxModelLen" if parallel else "a shorter maxModelLen, on one GPU"
    return text + f" Nothing tried fits ({tried}): use GPUs with more memory or a quantized model."


def serving_suggestions(est: ServingEstimate, *, gpus: int, parallel: bool = True) -> list[str]:
    """The smallest tensor-parallel size that fits (vLLM; the transformers engine uses one GPU),
    and the longest maxModelLen that fits as is: the estimate's own settings, one changed."""
    shape, out = est.shape, []
    for tp in TP_CHOICES if parallel else ():
        if tp <= est.tensor_parallel or shape.heads % tp:
            continue
        bigger = serving_estimate(shape, **{**est.settings, "tensor_parallel": tp})
        if bigger is not None and bigger.fits:
            extra = f" and gpus: {tp}" if tp > gpus else ""
            out.append(f"tensorParallelSize: {tp}{extra} (KV cache for {bigger.kv_tokens:,} tokens per replica)")
            break
    if est.kv_space > 0 and est.max_model_len and est.kv_tokens >= 1024:
        length = (est.kv_tokens // 1024) * 1024
        out.append(f"engineArgs.maxModelLen: {length} (or less)")
    return out
