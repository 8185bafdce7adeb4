"""Per-GPU memory estimate of a training spec: `kubetune estimate` and the operator's admission check.

Pure arithmetic over the spec and the model's shape (its `config.json`, a known architecture, or
`--params 7B`); nothing here imports torch or reads a file, so the admission webhook can run it in
milliseconds (`kubetune.trainer.artifacts.model_shape` reads a model's `config.json`;
`kubetune.trainer.cli.estimate` is the command).

Model states, per parameter (Psi = parameter count, Psi_t = trainable ones, N = data-parallel
ranks = nodes x gpusPerNode); the split follows the ZeRO paper (Rajbhandari et al. 2020,
arXiv:1910.02054, section 3.1: "2 Psi + 2 Psi + K Psi" with K = 12 for mixed-precision Adam) and
LlamaFactory's accounting (Zheng et al. 2024, arXiv:2403.13372, section 3: 18 bytes per parameter
for mixed precision, 8 for pure bfloat16, 0.6 for 4-bit QLoRA):

- weights: the trainer's load dtype. Under bf16/fp16 mixed precision `full`/`freeze`/`galore`
  keep fp32 master weights (4 bytes) plus the 16-bit copies autocast saves for backward (2);
  `model.dtype: bfloat16` is pure bf16 (2). LoRA bases load in the compute dtype; QLoRA's linear
  layers take 4.5 bits/param with NF4 (4.127 with double quantisation: one fp32 absmax per 64
  weights, or 8-bit absmax per 64 plus fp32 per 256 blocks), and its remaining parameters are
  cast to fp32 by PEFT's `prepare_model_for_kbit_training`. LoRA adapters are fp32 (PEFT's
  `autocast_adapter_dtype`).
- gradients: one per trainable parameter, in the trainable parameters' dtype.
- optimizer: AdamW keeps two states per trainable parameter in the parameter's dtype (8 bytes
  for fp32); 8-bit AdamW (bitsandbytes) two 1-byte states; SGD none; GaLore keeps AdamW states of
  the rank-r projections (max(m, n) x r per m x n matrix, plus the min(m, n) x r projector).
- DeepSpeed ZeRO keeps 16-bit weights and gradients and puts the fp32 master copy in the
  optimizer (K = 12 bytes per trainable parameter); stage >= 1 divides the optimizer states by N,
  stage >= 2 the gradients, stage 3 the weights (plus a working set of ~2 gathered layers).
  `offloadOptimizer` moves the optimizer to CPU memory, `offloadParams` the weights.

Activations, per GPU, for T = batchSize x maxLength tokens (every sequence padded or packed to
maxLength: the worst case a step can hit). Per decoder layer and token the backward pass keeps
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198, section 4.1, 34·s·b·h bytes per layer for a 16-bit GPT layer; redone here for a
Llama layer with a gated MLP and fused SDPA/flash attention, Dao et al. 2022, which keeps no
s x s score matrix):

    elements per token per layer = 6h + 3·a·d + 2·k·d + 4·I
      (each of the two RMSNorms keeps its input, the normalised input and its output, which is
       the input of the q/k/v or gate/up projections: 6h; q, attention output and o_proj
       input: 3·a·d; k and v: 2·k·d; gate, up, SiLU(gate) and their product: 4·I)

times the activation width (2 bytes under bf16/fp16 autocast, 4 in fp32). (Checked against the
tensors autograd actually saves for a 768-wide Llama in fp32: 64.6 KB per token and layer,
formula 66.6 KB.) LoRA with dropout adds a copy of each adapted module's input plus a 1-byte
mask (PEFT applies dropout per module). `eager` attention
adds the a x s probability matrix per token (fp32 softmax + its 16-bit copy). With gradient
checkpointing only each layer's input (h per token) is kept, plus one layer recomputed in
backward. The loss adds T x vocab x (logits + their fp32 copy + log-softmax + its gradient).

Gradients only exist from the backward pass to the optimizer step, while the activations are
freed during backward: with one micro-batch per step on one process (no DDP buckets, no ZeRO
buffers) the step's peak holds the larger of the two, not both (the `overlap` line subtracts
the smaller one). Estimates are per GPU, at the peak of a training step; a fixed `overhead` (CUDA context, cuBLAS
workspace, allocator slack) is added on GPUs. Checked against measured CPU RSS of a real run and
against LlamaFactory's published numbers (tests/test_estimate.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.trainer.api.builtin import BUILTINS, builtin_name
from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import ROLLOUT_STAGES, TrainingSpec

GIB = 1024**3
GPU_OVERHEAD_GIB = 0.75
"""CUDA context, cuBLAS/NCCL workspaces and allocator slack, per GPU."""

# --------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    name: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True
    tied_embeddings: bool = False
    experts: int = 1
    """MoE: experts per layer (all hold weights)."""
    active_experts: int = 1
    """MoE: experts each token passes through (they hold activations)."""
    attention_bias: bool = False
    shared_intermediate: int = 0
    """MoE: width of the shared expert every token also passes through (Qwen-MoE), 0 for none."""
    params_override: int | None = None
    """A parameter count given by the user (`--params 7B`): the groups below are scaled to it."""
    vision_hidden: int = 0
    """Vision-language models: the vision tower's width (0: a text model), layers and MLP width."""
    vision_layers: int = 0
    vision_intermediate: int = 0
    vision_patches: int = 0
    """Patch embeddings (+ class and position) of one image: the tower's input layer."""
    projector_in: int = 0
    """The projector's input and middle widths (0: LLaVA's, the tower's width and the text
    width); Qwen2-VL's merger takes 2x2 merged patches (4 x the tower's width) through a layer of
    that width."""
    projector_mid: int = 0
    max_positions: int = 0
    """The context length the model was trained for (`max_position_embeddings`): vLLM's default
    `--max-model-len`. 0 when unknown."""

    @property
    def vision_params(self) -> int:
        """The vision tower's parameters: per layer attention (4 h x h + biases), MLP and norms,
        plus the patch and position embeddings."""
        h, i = self.vision_hidden, self.vision_intermediate
        per_layer = 4 * (h * h + h) + 2 * h * i + h + i + 4 * h
        return self.vision_layers * per_layer + self.vision_patches * h + 4 * h if h else 0

    @property
    def projector_params(self) -> int:
        """The projector's two linear layers: LLaVA's vision width -> text width -> text width,
        Qwen2-VL's merged patches -> the same width -> text width (after a LayerNorm)."""
        if not self.vision_hidden:
            return 0
        wide, mid = self.projector_in or self.vision_hidden, self.projector_mid or self.hidden
        norm = 2 * self.vision_hidden if self.projector_in else 0
        return wide * mid + mid + mid * self.hidden + self.hidden + norm

    def vision_lora_params(self, rank: int) -> int:
        """LoRA on the tower's linear layers (q, k, v, out, fc1, fc2) at `rank`."""
        h, i = self.vision_hidden, self.vision_intermediate
        return self.vision_layers * rank * (4 * 2 * h + 2 * (h + i))

    # -- parameter groups (counts) -------------------------------------------------------
    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: module name -> (in features, out features), one expert's MLP."""
        h, a, k, d, i = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        mods = {"q_proj": (h, a * d), "k_proj": (h, k * d), "v_proj": (h, k * d), "o_proj": (a * d, h)}
        if self.gated_mlp:
            mods.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            mods.update(up_proj=(h, i), down_proj=(i, h))
        return mods

    def _scale(self) -> float:
        if self.params_override is None:
            return 1.0
        return self.params_override / self._raw_total()

    def _raw_groups(self) -> dict[str, float]:
        mods = self.linear_modules()
        attn = sum(i * o for n, (i, o) in mods.items() if n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = sum(i * o for n, (i, o) in mods.items() if n not in ("q_proj", "k_proj", "v_proj", "o_proj"))
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        router = self.hidden * self.experts if self.experts > 1 else 0
        shared = 3 * self.hidden * self.shared_intermediate  # the shared expert's gated MLP
        return {
            "embed": self.vocab * self.hidden,
            "lm_head": 0 if self.tied_embeddings else self.vocab * self.hidden,
            "layer_linear": attn + mlp * self.experts + shared,
            "layer_other": 2 * self.hidden + bias + router + (self.hidden if shared else 0),
            "final_norm": self.hidden,
        }

    def _raw_total(self) -> float:
        g = self._raw_groups()
        return g["embed"] + g["lm_head"] + self.layers * (g["layer_linear"] + g["layer_other"]) + g["final_norm"]

    def groups(self) -> dict[str, float]:
        """Parameter counts: embed, lm_head, layer_linear and layer_other (per layer), final_norm."""
        s = self._scale()
        return {k: v * s for k, v in self._raw_groups().items()}

    @property
    def parameters(self) -> int:
        return round(self.params_override if self.params_override is not None else self._raw_total())

    @property
    def active_parameters(self) -> int:
        """Parameters one token passes through: all of them for a dense model; for an MoE model
        the experts it is not routed to are left out (every expert still holds memory)."""
        mlp = sum(i * o for n, (i, o) in self.linear_modules().items() if n not in ("q_proj", "k_proj", "v_proj", "o_proj"))
        idle = self.layers * mlp * (self.experts - self.active_experts)
        return round(self.parameters - idle * self._scale())


def _get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


_UNGATED = {"gpt2", "opt", "gpt_neox", "gptj", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2"}
_TIED_BY_DEFAULT = {"gpt2", "opt", "gemma", "gemma2", "gemma3_text", "bloom", "gpt_bigcode", "phi"}


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """A ModelShape from a Hugging Face `config.json` (Llama, Mistral, Qwen2, Gemma, Mixtral,
    GPT-2/NeoX-style key names)."""
    config = {**config, **(config.get("text_config") or {})}
    model_type = str(config.get("model_type") or "")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _get(config, "vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        raise ValueError(f"{name}: config.json lacks hidden_size/num_hidden_layers/num_attention_heads/vocab_size")
    experts = int(_get(config, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    # an MoE config may also name a dense MLP width (`intermediate_size`, Qwen-MoE): experts use theirs
    names = ("moe_intermediate_size",) if experts > 1 else ()
    intermediate = _get(config, *names, "intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", default=4 * hidden)
    kv = _get(config, "num_key_value_heads", "num_kv_heads", default=heads)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    active = int(_get(config, "num_experts_per_tok", "moe_topk", default=1) or 1)
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in _TIED_BY_DEFAULT
    vision = _vision_shape(config.get("vision_config") or {})
    return ModelShape(**vision,
        name=name, hidden=hidden, layers=layers, vocab=vocab, intermediate=intermediate or 4 * hidden,
        heads=heads, kv_heads=kv, head_dim=head_dim, gated_mlp=model_type not in _UNGATED,
        tied_embeddings=bool(tied), experts=experts, active_experts=min(active, experts),
        attention_bias=bool(config.get("attention_bias") or model_type in ("qwen2", "qwen2_moe")),
        shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0) if experts > 1 else 0,
        max_positions=int(_get(config, "max_position_embeddings", "n_positions", "max_sequence_length", default=0) or 0),
    )


def _vision_shape(vision: dict[str, Any]) -> dict[str, int]:
    """A vision-language model's tower (`vision_config`, CLIP/SigLIP key names, or Qwen2-VL's:
    `embed_dim` wide, `depth` layers; its `hidden_size` is the merger's output) for ModelShape."""
    if "depth" in vision and "embed_dim" in vision:
        return _qwen_vision_shape(vision)
    hidden = _get(vision, "hidden_size", "embed_dim", default=0)
    if not hidden:
        return {}
    image, patch = _get(vision, "image_size", default=224), _get(vision, "patch_size", default=14)
    channels = _get(vision, "num_channels", "in_channels", default=3)
    patches = (image // patch) ** 2 if isinstance(image, int) and isinstance(patch, int) else 256
    return {"vision_hidden": hidden, "vision_layers": _get(vision, "num_hidden_layers", "depth", default=24),
            "vision_intermediate": _get(vision, "intermediate_size", default=4 * hidden),
            "vision_patches": patches + 1 + channels * (patch if isinstance(patch, int) else 14) ** 2}


def _qwen_vision_shape(vision: dict[str, Any]) -> dict[str, int]:
    """Qwen2-VL's tower: rotary positions (no position table), a 3-D patch convolution over
    `temporal_patch_size` frames, and a merger from 2x2 merged patches to the text width."""
    width, patch = int(vision["embed_dim"]), int(vision.get("patch_size") or 14)
    merged = width * int(vision.get("spatial_merge_size") or 2) ** 2
    channels = int(vision.get("in_channels") or 3) * int(vision.get("temporal_patch_size") or 2)
    return {"vision_hidden": width, "vision_layers": int(vision["depth"]),
            "vision_intermediate": int(vision.get("mlp_ratio") or 4) * width,
            "vision_patches": channels * patch * patch, "projector_in": merged, "projector_mid": merged}


def _shape(name: str, h: int, layers: int, vocab: int, inter: int, heads: int, kv: int, **kw: Any) -> ModelShape:
    return ModelShape(name=name, hidden=h, layers=layers, vocab=vocab, intermediate=inter, heads=heads,
                      kv_heads=kv, head_dim=kw.pop("head_dim", h // heads), **kw)


KNOWN_SHAPES: dict[str, ModelShape] = {
    # Values from each model's public config.json; matched as substrings of a lowercased path.
    "llama-2-7b": _shape("llama-2-7b", 4096, 32, 32000, 11008, 32, 32, max_positions=4096),
    "llama-2-13b": _shape("llama-2-13b", 5120, 40, 32000, 13824, 40, 40, max_positions=4096),
    "llama-2-70b": _shape("llama-2-70b", 8192, 80, 32000, 28672, 64, 8, max_positions=4096),
    "llama-3.2-1b": _shape("llama-3.2-1b", 2048, 16, 128256, 8192, 32, 8, tied_embeddings=True, max_positions=131072),
    "llama-3.2-3b": _shape("llama-3.2-3b", 3072, 28, 128256, 8192, 24, 8, tied_embeddings=True, max_positions=131072),
    "llama-3.1-8b": _shape("llama-3.1-8b", 4096, 32, 128256, 14336, 32, 8, max_positions=131072),
    "llama-3-8b": _shape("llama-3-8b", 4096, 32, 128256, 14336, 32, 8, max_positions=8192),
    "llama-3.1-70b": _shape("llama-3.1-70b", 8192, 80, 128256, 28672, 64, 8, max_positions=131072),
    "llama-3-70b": _shape("llama-3-70b", 8192, 80, 128256, 28672, 64, 8, max_positions=8192),
    "mistral-7b": _shape("mistral-7b", 4096, 32, 32000, 14336, 32, 8, max_positions=32768),
    "mixtral-8x7b": _shape("mixtral-8x7b", 4096, 32, 32000, 14336, 32, 8, experts=8, active_experts=2, max_positions=32768),
    "qwen2.5-0.5b": _shape("qwen2.5-0.5b", 896, 24, 151936, 4864, 14, 2, tied_embeddings=True, attention_bias=True, max_positions=32768),
    "qwen2.5-1.5b": _shape("qwen2.5-1.5b", 1536, 28, 151936, 8960, 12, 2, tied_embeddings=True, attention_bias=True, max_positions=32768),
    "qwen2.5-7b": _shape("qwen2.5-7b", 3584, 28, 152064, 18944, 28, 4, attention_bias=True, max_positions=32768),
    "qwen2.5-14b": _shape("qwen2.5-14b", 5120, 48, 152064, 13824, 40, 8, attention_bias=True, max_positions=32768),
    "gemma-2b": _shape("gemma-2b", 2048, 18, 256000, 16384, 8, 1, head_dim=256, tied_embeddings=True, max_positions=8192),
    "gemma-7b": _shape("gemma-7b", 3072, 28, 256000, 24576, 16, 16, head_dim=256, tied_embeddings=True, max_positions=8192),
}
_SCALE_REFERENCES = ("llama-3.2-1b", "llama-3.2-3b", "llama-2-7b", "llama-2-13b", "llama-2-70b")

_PARAMS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*$")


def parse_params(text: str | int | float) -> int:
    """`7B`, `350M`, `1.5b`, `7000000000` -> a parameter count."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    match = _PARAMS_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a parameter count (use e.g. 7B, 350M, 1.5B)")
    unit = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive parameter count")
    return value


def shape_for_params(params: int) -> ModelShape:
    """A Llama shape for a bare parameter count: the nearest reference model's layout, its
    parameter groups scaled to `params`."""
    ref = min((KNOWN_SHAPES[n] for n in _SCALE_REFERENCES), key=lambda s: abs(math.log(s.parameters / params)))
    return replace(ref, name=f"{_human(params)} ({ref.name}-like)", params_override=params)


def known_shape(location: str) -> ModelShape | None:
    lowered = location.lower().replace("_", "-")
    for key in sorted(KNOWN_SHAPES, key=len, reverse=True):
        if key in lowered:
            return KNOWN_SHAPES[key]
    return None


def shape_for_path(model_path: str, params: str | int | None = None, *, config: dict[str, Any] | None = None) -> ModelShape | None:
    """The model's shape from what is known without reading files: its `config.json` when the
    caller read one (`kubetune.trainer.artifacts.model_shape.resolve_shape` does), a builtin
    model's nominal config, a known architecture named in the path; `params` overrides the
    parameter count (and alone gives a Llama-like shape). None when nothing is known."""
    builtin = builtin_name(model_path)
    if config is not None:
        shape: ModelShape | None = shape_from_config(config, model_path)
    elif builtin is not None:
        shape = shape_from_config({"model_type": "llama", **BUILTINS[builtin]}, model_path)
    else:
        shape = known_shape(model_path)
    if params is not None:
        count = parse_params(params)
        return replace(shape, params_override=count) if shape is not None else shape_for_params(count)
    return shape


# --------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    """Bytes per GPU by component, and what went into them."""

    components: dict[str, float]
    shape: ModelShape
    ranks: int
    parameters: int
    trainable: int
    precision: str
    device: str
    cpu_offload_bytes: float = 0.0
    working_set_bytes: float = 0.0
    """ZeRO-3: the gathered layers' full weights (part of `weights`)."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def gib(self, name: str) -> float:
        return self.components.get(name, 0.0) / GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.total_gib <= gpu_gib

    def short(self) -> str:
        return f"~{self.total_gib:.1f} GiB per GPU"

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.components.items() if v and k != "overlap")
        return f"~{self.total_gib:.1f} GiB per GPU ({parts} GiB)"


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TARGET_ALIASES = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"), "dense": ("o_proj",),
    "c_fc": ("up_proj",), "fc1": ("up_proj",), "fc2": ("down_proj",), "w1": ("gate_proj",), "w3": ("up_proj",),
    "w2": ("down_proj",), "gate_up_proj": ("gate_proj", "up_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _targets(names: list[str], available: dict[str, tuple[int, int]]) -> list[str]:
    """Which per-layer linear modules a list of module names (LoRA targets, GaLore substrings) hits."""
    if names == ["all-linear"] or not names:
        return list(available)
    hit: set[str] = set()
    for raw in names:
        name = raw.split(".")[-1]
        if name in available:
            hit.add(name)
        hit.update(n for n in _TARGET_ALIASES.get(name, ()) if n in available)
        hit.update(n for n in available if name in n)
    return [n for n in available if n in hit] or list(available)


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}[name]


def _optimizer_state_bytes(optimizer: str, param_bytes: float) -> float:
    """Optimizer state bytes per trainable parameter of dtype width `param_bytes`."""
    name = optimizer.lower()
    if "8bit" in name or "bnb" in name:
        return 2.0
    if name.startswith("sgd"):
        return 0.0
    if "adafactor" in name:
        return 0.1 * param_bytes  # factored second moment: rows + columns, no first moment
    if "lion" in name:
        return param_bytes
    return 2.0 * param_bytes  # adam, adamw, adamw_torch_fused, ...


def estimate(
    spec: TrainingSpec,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    shape: ModelShape | None = None,
    params: str | int | None = None,
    overhead_gib: float | None = None,
) -> Estimate:
    """Peak memory per GPU (or per CPU process when `gpus_per_node` is 0) of a training step.

    Without `shape`, the model's shape comes from its path alone (a builtin or known model, or
    `params`): reading a local `config.json` is `artifacts.model_shape.resolve_shape`'s job."""
    shape = _estimate_shape(spec, shape, params)
    device = "gpu" if gpus_per_node > 0 else "cpu"
    ranks = max(1, nodes) * max(1, gpus_per_node)
    precision = _precision(spec, device)
    mixed = precision in ("bf16", "fp16")
    act_bytes = 2 if mixed else 4
    counts = _with_vision(spec, shape, _parameter_counts(spec, shape))
    weight_b, master_b = _parameter_bytes(spec, precision)
    states = _ModelStates(
        weights=_weight_bytes(spec, shape, counts, weight_b, mixed),
        gradients=_gradient_bytes(spec, shape, counts, weight_b),
        optimizer=_optimizer_bytes(spec, shape, counts, weight_b, master_b),
    )
    notes: list[str] = []
    if shape.vision_hidden:
        trained = [part for part, on in (("encoder", spec.vision.trainTower), ("projector", spec.vision.trainProjector)) if on]
        notes.append(f"vision encoder {_human(shape.vision_params)} + projector {_human(shape.projector_params)} parameters "
                     f"counted ({' and '.join(trained) + ' trained' if trained else 'frozen'}); image tokens count in data.maxLength")
    _zero_partition(spec, counts, states, ranks, weight_b, notes)
    sequences, seq_len = _stage_sequences(spec)
    frozen = _frozen_models(spec, counts.total * weight_b if spec.method != "qlora" else states.weights)
    if frozen:
        notes.append(f"stage {spec.stage} keeps {frozen / GIB:.1f} GiB of frozen models (reference/reward) per GPU")
    residual_b = 4 if (mixed and weight_b == 4) else act_bytes
    activations = _activation_bytes(spec, shape, sequences, seq_len, act_bytes, residual_b)
    components = _components(spec, states, activations, frozen, ranks=ranks, device=device, overhead_gib=overhead_gib)
    return Estimate(
        components=components, shape=shape, ranks=ranks, parameters=round(counts.total),
        trainable=round(counts.trainable), precision=precision, device=device,
        cpu_offload_bytes=states.cpu_offload, working_set_bytes=states.working_set, notes=notes,
    )


def _estimate_shape(spec: TrainingSpec, shape: ModelShape | None, params: str | int | None) -> ModelShape:
    """The shape to estimate with: the one given (its count overridden by `params`), else what
    the model path and `params` tell."""
    if shape is None:
        shape = shape_for_path(spec.model.path, params)
        if shape is None:
            raise SpecError(
                "model.path",
                f"the size of {spec.model.path!r} is unknown (no local config.json, not a known architecture).",
                "pass --params (e.g. --params 7B), or point model.path at a local model directory.",
            )
    elif params is not None:
        shape = replace(shape, params_override=parse_params(params))
    return shape


def _precision(spec: TrainingSpec, device: str) -> str:
    """The training precision, `auto` resolved: bf16 on GPUs, fp32 on a CPU."""
    precision = spec.train.precision
    if precision == "auto":
        precision = "bf16" if device == "gpu" else "fp32"
    return precision


# -- which parameters train, and in which groups ---------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """Parameter counts (scaled to a given `params`) and what trains."""

    embed: float
    lm_head: float
    per_layer_linear: float
    layer_other: float
    norms: float
    total: float
    full_trainable: float = 0.0
    """Trained in place, in the weights' dtype."""
    lora_params: float = 0.0
    """Adapters and the trained copies of `modulesToSave` (fp32)."""

    @property
    def trainable(self) -> float:
        return self.full_trainable + self.lora_params

    def by_name(self, patterns: list[str]) -> float:
        """Parameters of the embedding, lm_head and norm modules a list of module names hits."""
        count = 0.0
        for pattern in patterns:
            if "embed" in pattern or "wte" in pattern:
                count += self.embed
            elif "lm_head" in pattern or "output" in pattern:
                count += self.lm_head
            elif "norm" in pattern:
                count += self.norms
        return count


def _parameter_counts(spec: TrainingSpec, shape: ModelShape) -> _Counts:
    """The model's parameter groups, and which of them the method trains."""
    groups = shape.groups()
    layers = shape.layers
    embed, lm_head, per_layer_linear = groups["embed"], groups["lm_head"], groups["layer_linear"]
    norms = layers * groups["layer_other"] + groups["final_norm"]
    counts = _Counts(
        embed=embed, lm_head=lm_head, per_layer_linear=per_layer_linear, layer_other=groups["layer_other"],
        norms=norms, total=embed + lm_head + layers * per_layer_linear + norms,
    )
    if spec.method in ("full", "galore"):
        return replace(counts, full_trainable=counts.total - counts.by_name(spec.full.frozenModules))
    if spec.method == "freeze":
        n = min(abs(spec.freeze.trainableLayers), layers)
        trained = n * (per_layer_linear + groups["layer_other"]) + counts.by_name(spec.freeze.trainableModules)
        return replace(counts, full_trainable=trained)
    # lora, qlora: the adapters plus trained copies of the saved modules (fp32, like the adapters)
    return replace(counts, lora_params=_lora_parameters(spec, shape) + counts.by_name(spec.lora.modulesToSave))


def _with_vision(spec: TrainingSpec, shape: ModelShape, counts: _Counts) -> _Counts:
    """A vision-language model's tower and projector: in the weights always, trained only as
    `vision` asks (in full under full/freeze; under LoRA the tower gets adapters and the projector
    a trained fp32 copy)."""
    tower, projector = shape.vision_params, shape.projector_params
    if not tower:
        return counts
    counts = replace(counts, total=counts.total + tower + projector)
    if spec.uses_lora:
        extra = (shape.vision_lora_params(spec.lora.rank) if spec.vision.trainTower else 0) + (projector if spec.vision.trainProjector else 0)
        return replace(counts, lora_params=counts.lora_params + extra)
    extra = (tower if spec.vision.trainTower else 0) + (projector if spec.vision.trainProjector else 0)
    return replace(counts, full_trainable=counts.full_trainable + extra)


def _experts(shape: ModelShape, module: str, active: bool = False) -> int:
    """How many copies of a per-layer linear module there are (MoE MLPs: one per expert; with
    `active`, per token)."""
    if module in _LINEAR_NAMES[:4]:
        return 1
    return shape.active_experts if active else shape.experts


def _lora_parameters(spec: TrainingSpec, shape: ModelShape) -> float:
    """LoRA (and DoRA's magnitude vector) parameters over every targeted module of every layer;
    an MoE model's experts also when `lora.targetParameters` names them (r x (in + out) per expert)."""
    linear_names = shape.linear_modules()
    r = spec.lora.rank
    modules = _targets(spec.lora.targetModules, linear_names)
    if shape.experts > 1 and spec.lora.targetParameters:
        named = _targets([p.split(".")[-1] for p in spec.lora.targetParameters], linear_names)
        modules += [n for n in named if n not in modules and n not in _LINEAR_NAMES[:4]]
    count = 0.0
    for name in modules:
        fan_in, fan_out = linear_names[name]
        count += _experts(shape, name) * (r * (fan_in + fan_out) + (fan_out if spec.lora.useDora else 0))
    return count * (shape.layers * shape._scale())


# -- model states: weights, gradients, optimizer ----------------------------------------------


def _parameter_bytes(spec: TrainingSpec, precision: str) -> tuple[float, float]:
    """(bytes per weight, bytes of the fp32 master copy DeepSpeed's optimizer keeps)."""
    mixed = precision in ("bf16", "fp16")
    model_dtype = None if spec.model.dtype == "auto" else spec.model.dtype
    compute = _dtype_bytes(precision)
    if spec.distributed.deepspeed is not None:
        # DeepSpeed casts the module to the 16-bit compute dtype; the fp32 master lives in the optimizer.
        return compute, 4.0 if mixed else 0.0
    if spec.method in ("full", "freeze", "galore"):
        return _dtype_bytes(model_dtype) if model_dtype else (4 if mixed else compute), 0.0
    return _dtype_bytes(model_dtype) if model_dtype else compute, 0.0


def _quantized_bytes(spec: TrainingSpec) -> float:
    """QLoRA: bytes per quantised linear weight."""
    if spec.quantization.bits == 8:
        return 1.0 + 4 / 4096  # int8 weights + one fp32 scale per row (approx.)
    # 4 bits + the absmax constants per 64-weight block (fp32, or 8-bit + fp32 per 256 blocks)
    return 0.5 + (8 / 64 + 32 / (64 * 256) if spec.quantization.doubleQuant else 32 / 64) / 8


def _weight_bytes(spec: TrainingSpec, shape: ModelShape, counts: _Counts, weight_b: float, mixed: bool) -> float:
    """The weights: quantised linear layers plus fp32 others (QLoRA), else every parameter in the
    load dtype (plus autocast's 16-bit copies of fp32 weights that train in place)."""
    if spec.method == "qlora":
        rest = counts.embed + counts.lm_head + counts.norms + shape.vision_params + shape.projector_params
        return shape.layers * counts.per_layer_linear * _quantized_bytes(spec) + rest * 4.0
    weights = counts.total * weight_b
    if spec.distributed.deepspeed is None and mixed and spec.method in ("full", "freeze", "galore") and weight_b == 4:
        # autocast keeps a 16-bit copy of every weight it used, saved for the backward pass
        weights += counts.total * 2.0
    return weights


def _gradient_bytes(spec: TrainingSpec, shape: ModelShape, counts: _Counts, weight_b: float) -> float:
    """One gradient per trainable parameter in its dtype (adapters: fp32); DeepSpeed keeps them in
    the 16-bit compute dtype; layerwise GaLore holds only the largest parameter's at a time."""
    if spec.distributed.deepspeed is not None:
        return counts.trainable * weight_b
    if spec.method == "galore" and spec.galore.layerwise:
        # each parameter is stepped (and its gradient freed) as soon as its gradient exists
        largest = max(i * o for i, o in shape.linear_modules().values()) * shape._scale()
        return max(counts.embed, counts.lm_head, largest) * weight_b
    return counts.full_trainable * weight_b + counts.lora_params * 4.0


def _optimizer_bytes(spec: TrainingSpec, shape: ModelShape, counts: _Counts, weight_b: float, master_b: float) -> float:
    """Optimizer states of the trainable parameters (adapters: fp32; DeepSpeed: fp32 states plus
    the fp32 master copy it steps)."""
    opt = spec.train.optimizer
    if spec.method == "galore":
        return _galore_optimizer_bytes(spec, shape, counts, weight_b)
    if spec.distributed.deepspeed is not None:
        return counts.trainable * (_optimizer_state_bytes(opt, 4.0) + master_b)
    return counts.full_trainable * _optimizer_state_bytes(opt, weight_b) + counts.lora_params * _optimizer_state_bytes(opt, 4.0)


def _galore_optimizer_bytes(spec: TrainingSpec, shape: ModelShape, counts: _Counts, param_b: float) -> float:
    """GaLore: states of the rank-r projections of the targeted matrices plus their projectors,
    full states for every other trainable parameter."""
    g = spec.galore
    linear_names = shape.linear_modules()
    low_rank = projected = projectors = 0.0
    for name in _targets(g.targetModules, linear_names):
        fan_in, fan_out = linear_names[name]
        experts = _experts(shape, name)
        projected += experts * fan_in * fan_out
        low_rank += experts * (max(fan_in, fan_out) * g.rank)
        projectors += experts * min(fan_in, fan_out) * g.rank * param_b
    projected *= shape.layers * shape._scale()
    low_rank *= shape.layers * shape._scale()
    projectors *= shape.layers * shape._scale()
    return projectors + (low_rank + (counts.full_trainable - projected)) * _optimizer_state_bytes(spec.train.optimizer, param_b)


@dataclass
class _ModelStates:
    """Bytes per GPU of the model states, and what ZeRO offloads or gathers."""

    weights: float
    gradients: float
    optimizer: float
    cpu_offload: float = 0.0
    working_set: float = 0.0


def _zero_partition(spec: TrainingSpec, counts: _Counts, states: _ModelStates, ranks: int, weight_b: float,
                    notes: list[str]) -> None:
    """DeepSpeed ZeRO: stage >= 1 divides the optimizer states by the ranks, >= 2 the gradients,
    3 the weights (plus ~2 gathered layers); offload moves the optimizer/weights to CPU memory."""
    ds = spec.distributed.deepspeed
    if ds is None:
        return
    gathered = (2 * (counts.per_layer_linear + counts.layer_other) + counts.embed + counts.lm_head) * weight_b
    if ds.stage >= 1:
        states.optimizer /= ranks
    if ds.stage >= 2:
        states.gradients /= ranks
    if ds.stage == 3:
        if ranks > 1:
            states.working_set = min(states.weights, gathered)
        states.weights = states.weights / ranks + states.working_set
    if ds.offloadOptimizer:
        states.cpu_offload += states.optimizer
        states.optimizer = 0.0
    if ds.offloadParams:
        sharded = states.weights
        states.working_set = min(states.weights, gathered)
        states.weights = states.working_set
        states.cpu_offload += max(0.0, sharded - states.weights)
    if ranks == 1 and ds.stage >= 1:
        notes.append("ZeRO partitions across ranks: with one GPU only offloading saves memory")


# -- activations ------------------------------------------------------------------------------


def _layer_activation_bytes(spec: TrainingSpec, shape: ModelShape, seq_len: int, act_bytes: int) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (module docstring), plus
    LoRA dropout's input copies and masks, plus eager attention's probability matrix."""
    h, a, k, d, inter = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    mlp_elems = (4 * inter) * shape.active_experts if shape.gated_mlp else 3 * inter * shape.active_experts
    per_token_layer = (6 * h + 3 * a * d + 2 * k * d + mlp_elems) * act_bytes
    if spec.uses_lora and spec.lora.dropout > 0:
        # PEFT's dropout makes its own copy of each adapted module's input (kept for lora_A's
        # backward) plus a 1-byte mask
        linear_names = shape.linear_modules()
        fan_ins = sum(linear_names[n][0] * _experts(shape, n, active=True)
                      for n in _targets(spec.lora.targetModules, linear_names))
        per_token_layer += fan_ins * (act_bytes + 1)
    if spec.model.attnImplementation == "eager":
        per_token_layer += a * seq_len * (4 + act_bytes)
    return per_token_layer


def _activation_bytes(spec: TrainingSpec, shape: ModelShape, sequences: int, seq_len: int, act_bytes: int,
                      residual_b: int) -> float:
    """Activations of a step: every layer's (with gradient checkpointing only each layer's input,
    in `residual_b` bytes, plus one layer recomputed in backward) plus the loss's over the vocabulary."""
    tokens = sequences * seq_len
    per_token_layer = _layer_activation_bytes(spec, shape, seq_len, act_bytes)
    if spec.train.gradientCheckpointing:
        layer_acts = tokens * (shape.layers * shape.hidden * residual_b + per_token_layer)
    else:
        layer_acts = tokens * shape.layers * per_token_layer
    loss_acts = tokens * shape.vocab * (act_bytes + 4 + 4 + 4)
    return layer_acts + loss_acts


# -- the total --------------------------------------------------------------------------------


def _components(spec: TrainingSpec, states: _ModelStates, activations: float, frozen: float, *, ranks: int,
                device: str, overhead_gib: float | None) -> dict[str, float]:
    """Bytes per GPU by component, with the gradient/activation overlap and the GPU overhead."""
    components = {"weights": states.weights, "gradients": states.gradients, "optimizer": states.optimizer,
                  "activations": activations}
    if frozen:
        components["frozen models"] = frozen
    # Gradients are freed after every optimizer step (`zero_grad(set_to_none=True)`) and created
    # during backward as the activations are freed, so the two peak at different moments, unless
    # they persist: accumulated over micro-batches, DDP's reducer buckets, DeepSpeed's flat buffers.
    persistent_grads = spec.train.gradientAccumulation > 1 or spec.distributed.deepspeed is not None or ranks > 1
    if not persistent_grads and states.gradients and activations:
        components["overlap"] = -min(states.gradients, activations)
    if overhead_gib is None:
        overhead_gib = GPU_OVERHEAD_GIB if device == "gpu" else 0.0
    if overhead_gib:
        components["overhead"] = overhead_gib * GIB
    return components


def _stage_sequences(spec: TrainingSpec) -> tuple[int, int]:
    """(sequences per device per step, tokens per sequence) the stage's forward pass holds:
    preference stages run chosen and rejected (KTO: matched and mismatched) in one batch; rollout
    stages train on prompt + `maxNewTokens` answers, PPO on every sample of every prompt."""
    sequences, seq_len = spec.train.batchSize, spec.data.maxLength
    if spec.stage in ("rm", "dpo", "kto"):
        sequences *= 2
    if spec.stage in ROLLOUT_STAGES:
        seq_len += spec.generation.maxNewTokens
        if spec.stage == "ppo":
            sequences *= spec.generation.samplesPerPrompt
    return sequences, seq_len


def _frozen_models(spec: TrainingSpec, model_bytes: float) -> float:
    """Frozen copies next to the policy: the reference for dpo/kto/ppo/grpo(beta > 0) unless LoRA
    provides it by disabling adapters (or the loss is reference-free), and a reward model (assumed
    the policy's size; with LoRA assumed to be an adapter on the same base, which shares it)."""
    reference_free = spec.stage == "dpo" and spec.dpo.lossType in ("simpo", "orpo")
    needs_reference = spec.stage in ("dpo", "kto", "ppo") or (spec.stage == "grpo" and spec.grpo.beta > 0)
    frozen = model_bytes if needs_reference and not reference_free and not spec.uses_lora else 0.0
    if spec.stage in ROLLOUT_STAGES and spec.reward.model and not spec.uses_lora:
        frozen += model_bytes
    return frozen


# --------------------------------------------------------------------------------------------
# What would fit


def _with(spec: TrainingSpec, **changes: Any) -> TrainingSpec:
    """A copy of the spec with `block__field=value` changes."""
    data = spec.to_document()
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = value
    return TrainingSpec.model_validate(data)


def suggestions(
    spec: TrainingSpec, *, nodes: int, gpus_per_node: int, gpu_gib: float, shape: ModelShape, max_nodes: int = 64
) -> list[str]:
    """Changes that make the job fit on GPUs of `gpu_gib`, each with its estimate, cheapest first."""
    out: list[str] = []
    gpn = max(1, gpus_per_node)

    def fits(candidate: TrainingSpec, n: int) -> Estimate | None:
        est = estimate(candidate, nodes=n, gpus_per_node=gpn, shape=shape)
        return est if est.fits(gpu_gib) else None

    def min_nodes(candidate: TrainingSpec) -> tuple[int, Estimate] | None:
        for n in sorted({nodes, *[nodes * 2**i for i in range(1, 11)], max_nodes}):
            if n > max(max_nodes, nodes):
                break
            est = fits(candidate, n)
            if est is not None:
                return n, est
        return None

    ds = spec.distributed.deepspeed
    zero3 = {"stage": 3, "offloadOptimizer": bool(ds and ds.offloadOptimizer), "offloadParams": bool(ds and ds.offloadParams)}
    if not (ds and ds.stage == 3):
        found = min_nodes(_with(spec, distributed__deepspeed=zero3))
        if found:
            n, est = found
            where = f"nodes: {n} with " if n != nodes else ""
            out.append(f"{where}distributed.deepspeed.stage: 3 ({est.short()})")
    elif nodes < max_nodes:
        found = min_nodes(spec)
        if found and found[0] != nodes:
            out.append(f"nodes: {found[0]} ({found[1].short()})")
    zero3_here = any(o.startswith("distributed.deepspeed.stage: 3") for o in out)
    if not (ds and ds.offloadOptimizer) and not zero3_here:
        cand = _with(spec, distributed__deepspeed={**zero3, "offloadOptimizer": True})
        est = fits(cand, nodes)
        if est:
            out.append(f"distributed.deepspeed: {{stage: 3, offloadOptimizer: true}} ({est.short()}, "
                       f"{est.cpu_offload_bytes / GIB:.0f} GiB in CPU memory)")
    if not spec.train.gradientCheckpointing:
        est = fits(_with(spec, train__gradientCheckpointing=True), nodes)
        if est:
            out.append(f"train.gradientCheckpointing: true ({est.short()})")
    if spec.train.batchSize > 1:
        est = fits(_with(spec, train__batchSize=1, train__gradientAccumulation=spec.train.gradientAccumulation * spec.train.batchSize), nodes)
        if est:
            out.append(f"train.batchSize: 1 with gradientAccumulation: "
                       f"{spec.train.gradientAccumulation * spec.train.batchSize} ({est.short()})")
    if spec.method not in ("lora", "qlora"):
        est = fits(_with(spec, method="lora"), nodes)
        if est:
            out.append(f"method: lora ({est.short()})")
    if spec.method != "qlora":
        cand = _with(spec, method="qlora", train__gradientCheckpointing=True)
        est = fits(cand, nodes)
        if est:
            ckpt = "" if spec.train.gradientCheckpointing else " with train.gradientCheckpointing: true"
            out.append(f"method: qlora{ckpt} ({est.short()})")
    return out


def fit_message(
    spec: TrainingSpec, *, nodes: int, gpus_per_node: int, gpu_gib: float, shape: ModelShape, est: Estimate | None = None
) -> str:
    """Why the job does not fit and what would (for the admission refusal and the CLI)."""
    est = est or estimate(spec, nodes=nodes, gpus_per_node=gpus_per_node, shape=shape)
    where = f"{nodes} node(s) x {gpus_per_node} GPU(s) of {gpu_gib:g} GiB"
    text = (f"the training needs {est.summary()} with method {spec.method}, {est.precision}"
            f"{_zero_text(spec)} on {where} ({shape.name}, {_human(est.parameters)} parameters).")
    options = suggestions(spec, nodes=nodes, gpus_per_node=gpus_per_node, gpu_gib=gpu_gib, shape=shape)
    if options:
        text += " It would fit with: " + "; or ".join(options) + "."
    else:
        text += " Nothing tried fits (more nodes with ZeRO-3, CPU offload, QLoRA): use GPUs with more memory."
    return text


def _zero_text(spec: TrainingSpec) -> str:
    ds = spec.distributed.deepspeed
    if ds is None:
        return ", no ZeRO (every GPU holds a full replica)"
    off = [n for n, on in (("optimizer", ds.offloadOptimizer), ("params", ds.offloadParams)) if on]
    return f", ZeRO-{ds.stage}" + (f" with {'+'.join(off)} offload" if off else "")


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(int(count))
