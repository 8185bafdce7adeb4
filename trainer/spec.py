"""The training spec: the one source of truth for what a kubetune run does.

The same pydantic model is read from a local YAML file (`kubetune train job.yaml`), from a
`FineTuneJob`'s `spec.training` on the cluster, and is turned into the CRD's OpenAPI schema by
the operator. Field names are camelCase (the Kubernetes convention) and are spelled the same in
YAML and in Python (`spec.train.maxSteps`), so what a user reads in a manifest is what a developer
greps for in the code. Unknown keys, including snake_case spellings, are refused.

Design rules that keep the CRD schema structural:
- no unions of different types (a field is one type, optionally nullable);
- enums are string literals;
- every nested block is its own model with defaults, so a minimal spec stays a few lines.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stage = Literal["pt", "sft", "rm", "dpo"]
"""Training stage. `pt`: continued pretraining on plain text; `sft`: instruction tuning; `rm`: a
reward model on preference pairs; `dpo`: direct preference optimisation (and its variants)."""

Method = Literal["full", "freeze", "lora", "qlora", "galore"]
"""Which parameters are trained, and how."""

DatasetFormat = Literal["auto", "text", "alpaca", "sharegpt", "lmflow", "preference", "hh", "unpaired"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2"]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
MixStrategy = Literal["concat", "interleave_under", "interleave_over"]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class SpecModel(BaseModel):
    """Base for every spec block: unknown keys refused, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )


class RopeScalingSpec(SpecModel):
    """RoPE scaling for contexts longer than the model was trained on."""

    type: Literal["linear", "dynamic", "yarn", "llama3"] = "linear"
    """`linear` (position interpolation), `dynamic` (NTK-aware), `yarn`, `llama3`."""
    factor: float | None = Field(None, ge=1)
    """Context multiplier. Default: ceil(data.maxLength / the model's context length)."""


class QuantizationSpec(SpecModel):
    """Weight quantisation of the frozen base under `method: qlora` (bitsandbytes)."""

    bits: Literal[4, 8] = 4
    quantType: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is the QLoRA paper's normal-float format."""
    doubleQuant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    computeDtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the 4-bit matmuls compute in; `auto` follows the training precision."""


class ModelSpec(SpecModel):
    """The base model to fine-tune."""

    path: str = Field(min_length=1)
    """Local directory, `s3://bucket/prefix`, Hugging Face hub id, or `builtin:tiny-llama` (a tiny
    model built locally for demos and tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    dtype: ModelDtype = "auto"
    """Weights dtype when loading; `auto` follows `train.precision`."""
    attnImplementation: AttnImplementation = "auto"
    """`auto` picks flash_attention_2 when installed on a supported GPU, else sdpa, else eager."""
    trustRemoteCode: bool = False
    """Allow model code from the model repository to run. Off by default: it executes remote code."""
    ropeScaling: RopeScalingSpec | None = None
    """Extend the context window (position interpolation). Saved into the model's config."""
    ligerKernel: bool = False
    """Use Liger's fused Triton kernels (RMSNorm, SwiGLU, fused linear cross-entropy) when the
    `liger-kernel` package and a GPU are present; ignored with a warning otherwise."""


class ColumnMap(SpecModel):
    """Column names in the source data, when they differ from the format's defaults."""

    text: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None
    history: str | None = None
    messages: str | None = None
    tools: str | None = None
    prompt: str | None = None
    """Preference/RL data: the prompt (a string, or a list of turns)."""
    chosen: str | None = None
    """Preference data: the preferred answer (a string, a turn, or a list of turns)."""
    rejected: str | None = None
    """Preference data: the dispreferred answer."""
    completion: str | None = None
    """Unpaired preference data: the answer that `label` judges."""
    label: str | None = None
    """Unpaired preference data: true when `completion` is desirable."""


class DatasetSpec(SpecModel):
    """One dataset source."""

    path: str = Field(min_length=1)
    """A JSON/JSONL/Parquet/CSV file, a directory of them, an `s3://` URI, or a hub dataset id."""
    format: DatasetFormat = "auto"
    """`text` (plain text), `alpaca` (instruction/input/output), `sharegpt` (conversations),
    `lmflow` (`{"type": "text_only"|"text2text", "instances": [...]}`); preference data for `rm`/`dpo`:
    `preference` (prompt or instruction/input or conversations, plus `chosen` and `rejected`),
    `hh` (HH-RLHF: two whole dialogues `chosen`/`rejected` sharing a prefix), `unpaired`
    (prompt, `completion`, boolean `label`); `auto` detects it."""
    split: str = "train"
    subset: str | None = None
    """Configuration name of a hub dataset."""
    columns: ColumnMap = Field(default_factory=ColumnMap)
    weight: PositiveFloat | None = None
    """Relative sampling weight when several datasets are mixed with an interleave strategy."""
    maxSamples: PositiveInt | None = None
    """Use at most this many examples from this source (for quick experiments)."""


class DataSpec(SpecModel):
    """What to train on and how it is turned into token sequences."""

    datasets: list[DatasetSpec] = Field(min_length=1)
    evalDatasets: list[DatasetSpec] = Field(default_factory=list)
    """Explicit evaluation sets. When empty, `evalSize` holds out part of the training data."""
    evalSize: float = Field(0.0, ge=0)
    """Held-out evaluation share: a fraction when < 1, a number of examples when >= 1."""
    maxLength: int = Field(1024, ge=8)
    """Maximum tokens per training sequence; longer examples are truncated."""
    packing: bool | None = None
    """Concatenate examples into full-length sequences. Default: on for `pt`, off for `sft`."""
    template: str | None = None
    """Chat template: a built-in name (see `kubetune templates`) or a Jinja string. Default: the
    tokenizer's own `chat_template`, else the built-in `default`."""
    maskPrompt: bool = True
    """Exclude prompt tokens from the loss (labels -100) so only responses are learned."""
    mixStrategy: MixStrategy = "concat"
    """How several datasets are merged; interleave strategies honour each dataset's `weight`."""
    streaming: bool = False
    """Stream the data instead of loading it into memory (requires `train.maxSteps`)."""
    numProc: PositiveInt | None = None
    """Worker processes for tokenization."""
    shuffle: bool = True


class LoraSpec(SpecModel):
    """LoRA adapter settings (PEFT)."""

    rank: PositiveInt = 8
    alpha: PositiveFloat | None = None
    """Scaling numerator; default 2 x rank."""
    dropout: float = Field(0.05, ge=0, lt=1)
    targetModules: list[str] = Field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; `all-linear` targets every linear layer except the output head."""
    modulesToSave: list[str] = Field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. `embed_tokens`, `lm_head`)."""
    useDora: bool = False
    """DoRA: weight-decomposed LoRA (a learned magnitude vector per output feature)."""
    useRslora: bool = False
    """rsLoRA: scale by alpha/sqrt(rank) instead of alpha/rank (stable at high ranks)."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """Adapter initialisation: PiSSA/OLoRA start from the principal components / QR of the weights."""
    loraplusRatio: PositiveFloat | None = None
    """LoRA+: the B matrices learn at `learningRate x loraplusRatio` (the paper suggests 16)."""


class FreezeSpec(SpecModel):
    """Which parameters stay trainable under `method: freeze`."""

    trainableLayers: int = 2
    """Train the last N decoder layers (a negative N trains the first |N|)."""
    trainableModules: list[str] = Field(default_factory=list)
    """Further parameter-name substrings to train (e.g. `norm`, `embed_tokens`, `lm_head`)."""

    @model_validator(mode="after")
    def _something_trainable(self) -> FreezeSpec:
        if self.trainableLayers == 0 and not self.trainableModules:
            raise ValueError(
                "freeze leaves nothing trainable: set trainableLayers to a non-zero number "
                "or list trainableModules"
            )
        return self


class FullSpec(SpecModel):
    """Options for `method: full` (and `galore`)."""

    frozenModules: list[str] = Field(default_factory=list)
    """Parameter-name substrings kept frozen (e.g. `embed_tokens` to keep the embeddings fixed)."""


class GaloreSpec(SpecModel):
    """GaLore (gradient low-rank projection) for `method: galore`: full-parameter training with
    optimizer states in a low-rank subspace."""

    rank: PositiveInt = 16
    updateInterval: PositiveInt = 200
    """Steps between recomputing the projection."""
    scale: PositiveFloat = 0.25
    targetModules: list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    """Module-name substrings whose weights get GaLore; the rest use plain AdamW."""
    layerwise: bool = False
    """Per-layer optimizer steps (lower memory; no gradient accumulation, single process only)."""


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO, generated from these settings unless `config` points at a JSON file."""

    stage: Literal[0, 1, 2, 3] = 2
    offloadOptimizer: bool = False
    """Keep optimizer states in CPU memory."""
    offloadParams: bool = False
    """Keep parameters in CPU memory (stage 3 only)."""
    config: str | None = None
    """A DeepSpeed JSON config used as-is (batch sizes and precision set to `auto` are filled in)."""

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedSpec:
        if self.offloadParams and self.stage != 3:
            raise ValueError("offloadParams needs stage 3: ZeRO-1/2 do not partition parameters")
        return self


class DistributedSpec(SpecModel):
    """Multi-GPU / multi-node strategy. Plain DDP when nothing is set."""

    deepspeed: DeepSpeedSpec | None = None


class VocabSpec(SpecModel):
    """Vocabulary extension: new tokens added to the tokenizer, new embedding rows initialised to
    the mean of the old ones (plus small noise)."""

    addTokens: list[str] = Field(default_factory=list)
    tokensFile: str | None = None
    """A text file with one new token per line."""
    trainCorpus: list[str] = Field(default_factory=list)
    """Text/JSONL files to train a BPE tokenizer on; its tokens missing from the current
    vocabulary are added (LMFlow's tokenizer merging)."""
    trainVocabSize: PositiveInt = 1000
    """Vocabulary size of the tokenizer trained on `trainCorpus`."""
    noiseStd: float = Field(0.01, ge=0)
    """Std of the noise added to new rows, relative to the old rows' std."""

    @property
    def enabled(self) -> bool:
        return bool(self.addTokens or self.tokensFile or self.trainCorpus)


PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]


class DpoSpec(SpecModel):
    """Preference optimisation for `stage: dpo` (TRL's DPOTrainer)."""

    lossType: PreferenceLoss = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `hinge` (SLiC), `robust` (noisy labels, uses `labelSmoothing`),
    `simpo` (reference-free: length-normalised log-likelihood margin minus `simpoGamma`)."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL penalty (IPO: the regularisation tau). SimPO wants ~2."""
    labelSmoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed probability that a preference label is flipped (cDPO / robust DPO)."""
    simpoGamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin gamma (`lossType: simpo` only)."""
    referenceModel: str | None = None
    """Reference policy (path or `s3://` URI). Default: the model being trained, as it starts; with
    LoRA that is the base with adapters disabled, so no second copy is loaded."""


class TrainSpec(SpecModel):
    """Optimisation hyper-parameters."""

    epochs: PositiveFloat = 3.0
    maxSteps: PositiveInt | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batchSize: PositiveInt = 4
    """Sequences per device per step."""
    gradientAccumulation: PositiveInt = 1
    learningRate: PositiveFloat = 2e-4
    scheduler: Scheduler = "cosine"
    warmupRatio: float = Field(0.0, ge=0, lt=1)
    warmupSteps: NonNegativeInt = 0
    weightDecay: float = Field(0.0, ge=0)
    maxGradNorm: float = Field(1.0, ge=0)
    optimizer: str = "adamw_torch"
    """Any `optim` name transformers accepts (e.g. `adamw_torch`, `adamw_8bit`, `sgd`)."""
    seed: NonNegativeInt = 42
    precision: Precision = "auto"
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    gradientCheckpointing: bool = False
    evalEverySteps: PositiveInt | None = None
    """Evaluate every N steps. Default: once per epoch. An evaluation also runs before training."""


class CheckpointSpec(SpecModel):
    """When checkpoints are written and how a restarted run resumes."""

    everySteps: PositiveInt = 200
    keepLast: PositiveInt = 2
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in the output directory, if any;
    `never`: start fresh; or a path to a specific checkpoint."""


class OutputSpec(SpecModel):
    """Where results go."""

    path: str | None = None
    """Output directory (or `s3://` prefix): checkpoints, final model/adapter, metrics, loss.png.
    Default: `outputs/<name>` (`outputs/kubetune` when the run has no name)."""
    mergeAdapter: bool = False
    """With LoRA, also save the adapter merged into the base model under `merged/`."""


class StorageSpec(SpecModel):
    """How `s3://` locations are reached. Credentials never go here: they come the standard AWS
    way (environment, shared config, web identity/IRSA, instance role)."""

    endpointUrl: str | None = None
    """S3-compatible endpoint (MinIO, Ceph RGW); default: AWS, or `AWS_ENDPOINT_URL_S3`."""
    region: str | None = None
    pathStyle: bool = False
    """Address buckets as `endpoint/bucket` rather than `bucket.endpoint` (most MinIO setups)."""
    maxConcurrency: PositiveInt = 8
    """Parallel transfers (files and multipart parts)."""
    multipartThresholdMb: PositiveInt = 64
    """Files above this size are transferred in parts."""
    maxAttempts: PositiveInt = 8
    """Attempts per request under boto3's adaptive retry mode."""
    cacheDir: str | None = None
    """Local cache for downloaded models and datasets; default `$KUBETUNE_CACHE` or
    `~/.cache/kubetune`."""


class LoggingSpec(SpecModel):
    """What is reported during training."""

    everySteps: PositiveInt = 10
    reportTo: list[str] = Field(default_factory=list)
    """Extra trackers for transformers (`tensorboard`, `wandb`, ...). Metrics JSONL is always on."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    samples: NonNegativeInt = 3
    """Greedy generations on this many held-out prompts before and after training, logged and
    written to `samples.jsonl` (sft with an eval split; 0 turns it off)."""


class EvalSpec(SpecModel):
    """An evaluation of the final model, run at the end of training (`kubetune eval` on the
    output). Results go to `<output>/eval/` and into metrics.jsonl."""

    datasets: list[DatasetSpec] = Field(default_factory=list)
    """Datasets to evaluate on. Default: `data.evalDatasets`, else the training datasets."""
    tasks: list[Literal["perplexity", "generation", "choice"]] = Field(default_factory=lambda: ["perplexity", "generation"])
    """`perplexity`, `generation` (exact match, ROUGE-1/2/L, BLEU-4), `choice` (multiple choice)."""
    maxSamples: PositiveInt | None = 200
    """Evaluate on at most this many examples per dataset."""
    maxNewTokens: PositiveInt = 64


class TrainingSpec(SpecModel):
    """A complete fine-tuning run. The only required blocks are `model` and `data`."""

    name: str | None = None
    """Run name; a FineTuneJob's metadata.name is used when unset."""
    stage: Stage = "sft"
    """`pt`: continued pretraining on plain text (packed); `sft`: instruction tuning on
    conversations with the prompt masked from the loss."""
    model: ModelSpec
    """The base model (and tokenizer) to start from."""
    data: DataSpec
    """Training (and evaluation) data."""
    method: Method = "lora"
    """`full`: every weight; `freeze`: only the layers/modules in `freeze`; `lora`: low-rank
    adapters configured by `lora` (the base stays frozen)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter settings, used when `method` is `lora` or `qlora`."""
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    """Base-model quantisation, used when `method` is `qlora`."""
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    """Trainable layers/modules, used when `method` is `freeze`."""
    full: FullSpec = Field(default_factory=FullSpec)
    """Frozen modules, used when `method` is `full` or `galore`."""
    galore: GaloreSpec = Field(default_factory=GaloreSpec)
    """GaLore optimizer settings, used when `method` is `galore`."""
    vocab: VocabSpec = Field(default_factory=VocabSpec)
    """Tokens to add to the vocabulary before training."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """DeepSpeed ZeRO settings for multi-GPU/multi-node runs."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """Optimisation hyper-parameters, precision, evaluation cadence."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint cadence, retention and resume."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the model, checkpoints and metrics go."""
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    """Log cadence, level and extra trackers."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 endpoint and transfer settings for `s3://` locations."""
    eval: EvalSpec | None = None
    """Evaluate the final model when training ends (off unless set)."""
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    """Loss variant, beta and reference model, used when `stage` is `dpo`."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainingSpec:
        if self.data.streaming and self.train.maxSteps is None:
            raise ValueError(
                "data.streaming needs train.maxSteps: a streamed dataset has no known length, so "
                "the number of steps cannot be derived from train.epochs"
            )
        if self.method == "galore" and self.galore.layerwise and self.train.gradientAccumulation > 1:
            raise ValueError(
                "galore.layerwise steps each layer during backward, so it cannot accumulate "
                "gradients: set train.gradientAccumulation to 1 or galore.layerwise to false"
            )
        if self.stage in ("rm", "dpo") and self.data.streaming:
            raise ValueError(f"data.streaming is not supported for stage {self.stage}: set it to false")
        if self.data.streaming and (self.data.evalSize and not self.data.evalDatasets):
            raise ValueError(
                "data.evalSize cannot split a streamed dataset: list data.evalDatasets instead"
            )
        return self

    # Values derived from the spec live here so every consumer agrees on them.
    @property
    def packing_enabled(self) -> bool:
        if self.stage not in ("pt", "sft"):
            return False  # preference pairs and RL prompts are never packed
        return self.data.packing if self.data.packing is not None else self.stage == "pt"

    @property
    def output_path(self) -> str:
        return self.output.path or f"outputs/{self.name or 'kubetune'}"

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else 2.0 * self.lora.rank

    def to_document(self) -> dict[str, Any]:
        """The spec as it is written in YAML: camelCase keys, defaults filled in."""
        return self.model_dump(mode="json")
