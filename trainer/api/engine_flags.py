"""The inference engines' settings, one table per engine: the single place a setting is named.

Each `EngineFlag` says how one setting is spelled everywhere it travels:

    InferenceService `spec.engineArgs.<crd>`        (operator/resources.py builds the CRD schema)
      -> the server container's `kubetune serve <cli>` (operator/serving/render.py renders it)
      -> `kubetune serve`'s argparse flag `<cli>`     (trainer/cli/infer.py adds it)
      -> vLLM's server argument `<vllm>`              (trainer/serve/vllm_engine.py builds the argv)

Pure data (and two pure helpers): the operator imports it without the trainer's heavy modules.
A setting missing from one place is a setting with `None` there: `cli=None` reaches vLLM only
through `--vllm-arg` (the LoRA capacity, which depends on the InferenceService's adapters);
`vllm=None` is not a vLLM argument of its own (the draft model goes into `--speculative-config`;
the transformers engine's settings); `crd=None` cannot be set on an InferenceService.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.trainer.api.errors import SpecError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The largest LoRA ranks vLLM accepts (`--max-lora-rank`)."""
LOCATION_PATTERN = r"^[^\s-][^\s]*$"
"""A model location: no whitespace, not starting with `-` (it must stay a value on a command line)."""


def parse_size(value: str | int) -> int:
    """`1G` -> bytes, as vLLM's --kv-cache-memory-bytes reads it (K/M/G/T binary, k/m/g/t decimal)."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", text)
    if not match:
        raise SpecError("--kv-cache-memory", f"{text!r} is not a size.", "write it like 1G, 512M or a number of bytes.")
    number, unit = match.groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(number) * scale)


@dataclass(frozen=True)
class EngineFlag:
    """One engine setting, as the InferenceService, `kubetune serve` and vLLM spell it."""

    crd: str | None
    """The InferenceService field (in `engineArgs` unless `engine_args` is false); None: none."""
    cli: str | None
    """The `kubetune serve` flag; None: none (the operator passes it as `--vllm-arg`)."""
    type: Any
    """The value's type in the CRD schema (e.g. `int | None`); `list` settings repeat their flag."""
    help: str | None = None
    """The flag's `--help` text."""
    default: Any = None
    """The CRD field's default (and the flag's, unless `cli_default` is set)."""
    cli_default: Any = None
    """The flag's default where it differs from the CRD field's."""
    vllm: str | None = None
    """vLLM's server argument; None: not one of its own."""
    description: str | None = None
    """The CRD field's description."""
    constraints: Mapping[str, Any] = field(default_factory=dict)
    """Limits of the CRD field's value (`ge`, `le`, `gt`, `pattern`: pydantic's `Field` names)."""
    choices: tuple[Any, ...] | None = None
    """The flag's allowed values."""
    group: Literal["model", "serve", "vllm"] = "model"
    """Where `kubetune serve` adds the flag: the model arguments (also `generate` and `chat`), the
    server's, or the vLLM engine's."""
    metavar: str | None = None
    requires: str | None = None
    """Another setting (its `crd` name) without which the operator leaves this one out."""
    engine_args: bool = True
    """Part of `spec.engineArgs` (false: a field of the InferenceService spec itself)."""
    to_vllm: Callable[[Any], Any] | None = None
    """Converts the flag's value to vLLM's (e.g. a size to bytes)."""

    @property
    def dest(self) -> str | None:
        """The argparse destination of the flag (`--max-model-len` -> `max_model_len`)."""
        return self.cli.lstrip("-").replace("-", "_") if self.cli else None

    @property
    def repeated(self) -> bool:
        return self.type is list or getattr(self.type, "__origin__", None) is list

    @property
    def flag_default(self) -> Any:
        value = self.cli_default if self.cli_default is not None else self.default
        return list(value or []) if self.repeated else value


# -- the settings --------------------------------------------------------------------------------

DTYPE = EngineFlag("dtype", "--dtype", Literal[DTYPES], default="auto",
                   choices=DTYPES, vllm="--dtype")
MAX_MODEL_LEN = EngineFlag(
    "maxModelLen", "--max-model-len", int | None, vllm="--max-model-len", constraints={"ge": 1},
    help="cap the context length (default: the model's, RoPE scaling included)",
    description="Cap the context length (default: the model's).")
MAX_BATCH_SIZE = EngineFlag(
    "maxBatchSize", "--max-batch-size", int | None, vllm="--max-num-seqs", constraints={"ge": 1},
    group="serve", help="sequences decoded together (vLLM: --max-num-seqs; default: vLLM's own, 16 for the "
    "transformers engine)",
    description="Sequences decoded together (vLLM: `--max-num-seqs`). Unset: vLLM's own default (far above "
                "16: kubetune never caps vLLM below it), 16 for the transformers engine.")
DRAFT_MODEL = EngineFlag(
    "draftModel", "--draft-model", str | None, constraints={"pattern": LOCATION_PATTERN},
    help="speculative decoding with this smaller draft model (same tokenizer)",
    description="Speculative decoding: an `s3://` URI of a smaller draft model with the same tokenizer "
                "(fetched and cached like the model).")
NUM_SPECULATIVE_TOKENS = EngineFlag(
    "numSpeculativeTokens", "--num-assistant-tokens", int | None, constraints={"ge": 1, "le": 16},
    requires="draftModel", help="tokens the draft model proposes per step",
    description="Tokens the draft model proposes per step.")
TENSOR_PARALLEL_SIZE = EngineFlag(
    "tensorParallelSize", "--tensor-parallel-size", int | None, vllm="--tensor-parallel-size", group="vllm",
    engine_args=False)
QUANTIZATION = EngineFlag(
    "quantization", "--quantization", str | None, vllm="--quantization", group="vllm",
    constraints={"pattern": r"^[A-Za-z0-9_-]+$"}, description="vLLM quantization method (e.g. `awq`, `gptq`, `fp8`).")
GPU_MEMORY_UTILIZATION = EngineFlag(
    "gpuMemoryUtilization", "--gpu-memory-utilization", float | None, vllm="--gpu-memory-utilization", group="vllm",
    constraints={"gt": 0, "le": 1}, help="fraction of GPU memory (vLLM's CPU build: of the node's RAM) to reserve",
    description="vLLM: fraction of GPU memory for weights and KV cache.")
ENABLE_LORA = EngineFlag(None, None, bool, vllm="--enable-lora")
"""LoRA support: on when the operator serves adapters (`kubetune serve` turns it on for `--adapter`)."""
MAX_LORAS = EngineFlag(
    "maxLoras", None, int | None, vllm="--max-loras", constraints={"ge": 1, "le": 256},
    description="vLLM: adapters used together in one batch (GPU slots; more adapters are swapped in from host "
                "memory). Default 4 when `adapters` is set. Setting it turns LoRA support on even with no adapters "
                "yet, so that the first adapter is loaded without restarting the pods.")
MAX_LORA_RANK = EngineFlag(
    "maxLoraRank", None, Literal[LORA_RANKS] | None, vllm="--max-lora-rank",
    description="vLLM: the largest LoRA rank an adapter may have (vLLM's default 16; a LoRA model's own rank when "
                "the model is a LoRA output). An adapter added at runtime with a larger rank is refused (the pods' "
                "adapter agent logs why): raise this, which rolls the pods once.")
EXTRA_ARGS = EngineFlag(
    "extraArgs", "--vllm-arg", list[str], group="vllm", help="extra argument passed to vLLM's server (repeatable)",
    description="vLLM: more arguments for vLLM's server, passed as is (e.g. `--enable-prefix-caching`).")
KV_CACHE_MEMORY = EngineFlag(
    None, "--kv-cache-memory", str | None, vllm="--kv-cache-memory-bytes", metavar="SIZE", to_vllm=parse_size,
    help="vllm engine: KV cache size, e.g. 1G (vLLM's --kv-cache-memory-bytes; on CPU instead of reserving 92%% of "
         "the node's RAM)")
DEVICE = EngineFlag(None, "--device", str, default="auto", help="auto, cpu, cuda, cuda:1 (transformers engine)")


def image_limit(count: int) -> str:
    """vLLM's `--limit-mm-per-prompt` value for `count` images per prompt."""
    return f'{{"image": {int(count)}}}'


MAX_IMAGES = EngineFlag(
    "maxImagesPerPrompt", "--max-images", int | None, vllm="--limit-mm-per-prompt", to_vllm=image_limit,
    constraints={"ge": 1, "le": 64}, group="serve",
    help="vision-language models: images one request may carry (default 8 for the transformers engine; vLLM: "
         "--limit-mm-per-prompt, default its own)",
    description="Vision-language models: images one chat request may carry in `image_url` parts (vLLM: "
                "`--limit-mm-per-prompt`). Unset: 8 for the transformers engine, vLLM's own default.")

VLLM: tuple[EngineFlag, ...] = (
    DTYPE, MAX_MODEL_LEN, MAX_BATCH_SIZE, DRAFT_MODEL, NUM_SPECULATIVE_TOKENS, TENSOR_PARALLEL_SIZE, QUANTIZATION,
    GPU_MEMORY_UTILIZATION, ENABLE_LORA, MAX_LORAS, MAX_LORA_RANK, EXTRA_ARGS, KV_CACHE_MEMORY, MAX_IMAGES,
)
"""vLLM's settings, in the order the operator renders them."""
TRANSFORMERS: tuple[EngineFlag, ...] = (DTYPE, MAX_MODEL_LEN, MAX_BATCH_SIZE, DRAFT_MODEL, NUM_SPECULATIVE_TOKENS, DEVICE,
                                         MAX_IMAGES)
"""The transformers engine's settings."""
ENGINES: dict[str, tuple[EngineFlag, ...]] = {"vllm": VLLM, "transformers": TRANSFORMERS}


def _union(*tables: Sequence[EngineFlag]) -> tuple[EngineFlag, ...]:
    out: list[EngineFlag] = []
    for table in tables:
        out += [flag for flag in table if flag not in out]
    return tuple(out)


ALL: tuple[EngineFlag, ...] = _union(VLLM, TRANSFORMERS)
"""Every setting once, vLLM's order first."""


ENGINE_ARGS_ORDER = ("maxModelLen", "dtype", "quantization", "draftModel", "numSpeculativeTokens", "maxBatchSize",
                     "gpuMemoryUtilization", "extraArgs", "maxLoras", "maxLoraRank")
"""The order of `spec.engineArgs`' properties in the published CRD (kept: a new order would be a
new schema)."""


def engine_args_fields() -> tuple[EngineFlag, ...]:
    """The `spec.engineArgs` fields of an InferenceService, in the CRD's order."""
    fields = {flag.crd: flag for flag in ALL if flag.crd and flag.engine_args}
    return tuple(fields[name] for name in ENGINE_ARGS_ORDER if name in fields) + tuple(
        flag for name, flag in fields.items() if name not in ENGINE_ARGS_ORDER)


def vllm_only() -> tuple[EngineFlag, ...]:
    """`spec.engineArgs` fields only the vLLM engine takes (refused with `engine: transformers`)."""
    return tuple(flag for flag in engine_args_fields() if flag not in TRANSFORMERS)


def cli_flags(group: str) -> tuple[EngineFlag, ...]:
    """The `kubetune serve` flags of one argument group."""
    return tuple(flag for flag in ALL if flag.cli and flag.group == group)


def serve_args(engine: str, values: Mapping[str, Any], names: Sequence[str] | None = None) -> list[str]:
    """`kubetune serve` arguments for InferenceService settings (`values` by `crd` name) the
    engine takes, in the table's order (only `names`, when given); unset (falsy) ones are left out."""
    args: list[str] = []
    for flag in ENGINES[engine]:
        if not (flag.crd and flag.cli) or (names is not None and flag.crd not in names):
            continue
        value = values.get(flag.crd)
        if not value or (flag.requires and not values.get(flag.requires)):
            continue
        if flag.repeated:
            args += [f"{flag.cli}={item}" for item in value]  # one token: a value starting with `-` stays a value
        else:
            args += [flag.cli, str(value)]
    return args


def vllm_args(values: Mapping[str, Any]) -> list[str]:
    """vLLM server arguments for `kubetune serve` flag values (by argparse `dest`; missing ones
    take their default), for the settings that are vLLM arguments of their own; unset (falsy)
    ones are left out."""
    argv: list[str] = []
    for flag in VLLM:
        if not (flag.vllm and flag.dest):
            continue
        value = values.get(flag.dest, flag.default)
        if not value:
            continue
        if value is True:
            argv.append(flag.vllm)
        else:
            argv += [flag.vllm, str(flag.to_vllm(value) if flag.to_vllm else value)]
    return argv


def vllm_arg(flag: EngineFlag, value: Any) -> str:
    """`kubetune serve`'s pass-through spelling of a vLLM argument (`--vllm-arg=--max-loras=4`)."""
    return f"{EXTRA_ARGS.cli}={flag.vllm}" if value is True else f"{EXTRA_ARGS.cli}={flag.vllm}={value}"


def vllm_flag_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values (by argparse `dest`, e.g. `vars(args)`) of the `kubetune serve` flags that are
    vLLM arguments of their own: what `vllm_args` turns into vLLM's argv."""
    return {flag.dest: values[flag.dest] for flag in VLLM if flag.vllm and flag.dest and flag.dest in values}
