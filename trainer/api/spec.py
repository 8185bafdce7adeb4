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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo", "raft", "grpo"]
"""Training stage. `pt`: continued pretraining on plain text; `sft`: instruction tuning; `rm`: a
reward model on preference pairs; `dpo`: direct preference optimisation (and its variants); `kto`:
Kahneman-Tversky optimisation on unpaired judgements; `ppo`, `raft`, `grpo`: reinforcement learning
from a reward model or a reward function, on prompts the policy answers itself."""

PREFERENCE_STAGES = ("rm", "dpo", "kto")
"""Stages that train on judged answers (pairs or unpaired labels)."""
ROLLOUT_STAGES = ("ppo", "raft", "grpo")
"""Stages that generate their own answers and score them with `reward`."""

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
    ligerKernel: bool | None = None
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). Default:
    on when the `liger-kernel` package and a CUDA GPU are present, else off; `true` asks for them
    (a warning when they cannot run), `false` keeps the standard kernels. The start record of
    metrics.jsonl says which ran."""
    shiftAttention: bool = False
    """LongLoRA's shifted sparse attention (S²-Attn, LlamaFactory's `shift_attn`) for
    Llama-architecture models: in training, tokens attend inside groups of a quarter of
    `data.maxLength`, half of the heads over groups shifted by half a group, so attention costs
    O(length x group) rather than O(length²); evaluation, generation and the saved model use full
    attention. Works with padding-free batches (no attention across examples); needs sdpa or
    eager attention (`auto` picks sdpa)."""


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
    paddingFree: bool | None = None
    """Batches without pad tokens (`pt`, `sft`): a batch's examples are concatenated into one row
    whose `position_ids` restart at every example, so attention never crosses examples
    (flash-attn's varlen kernel and kubetune's per-example SDPA take the examples' boundaries;
    eager attention reads them from the positions) and no compute goes to padding; the loss is
    the same as padded batches'. Default: on, except for models with remote code
    (`model.trustRemoteCode`), whose attention may not read packed positions: padded then."""
    groupByLength: bool = False
    """Where batches are padded (`rm`/`dpo` pairs; `pt`/`sft` with `paddingFree: false`), draw
    them grouped by length (seeded mega-batches sorted inside, random across): far less padding,
    but batches of similar examples. Off by default: on the demo reward-model task it cut the pad
    tokens 6x and held-out accuracy fell from 0.94-1.0 to 0.69-0.92 over three seeds. For large
    datasets with widely spread lengths, where padding dominates the step time."""
    template: str | None = None
    """Chat template: a built-in name (see `kubetune templates`) or a Jinja string. Default: by the
    data's format: LMFlow `text2text` as input, output and eos (`plain`, as LMFlow trains it), plain
    text as it is, other conversations with the tokenizer's own `chat_template`; without one they
    are refused (set this) rather than wrapped in a made-up template."""
    maskPrompt: bool = True
    """Exclude prompt tokens from the loss (labels -100) so only responses are learned."""
    mixStrategy: MixStrategy = "concat"
    """How several datasets are merged; interleave strategies honour each dataset's `weight`."""
    streaming: bool = False
    """Stream the data instead of loading it into memory (requires `train.maxSteps`)."""
    numProc: PositiveInt | None = None
    """Worker processes for tokenization."""
    shuffle: bool = True
    cache: str | None = Field(None, min_length=1)
    """Tokenized-dataset cache: an `s3://` prefix or a local directory where `kubetune prepare`
    stores the token rows under a key of the data's content, tokenizer, template, maxLength and
    every other setting that changes them; training reads a complete entry instead of tokenizing.
    `auto`: `s3://<output bucket>/kubetune-cache/` for an S3 output, else `<storage cacheDir>/datasets`;
    `off`: no cache. With an `s3://` cache a FineTuneJob/AlignmentJob tokenizes once, in a
    CPU-only prepare pod, before the training pods start. Unset: `auto` for a multi-node job
    writing to S3 on the cluster, else no cache."""

    @model_validator(mode="after")
    def _cache_is_a_location(self) -> DataSpec:
        """A malformed `s3://` cache is refused with the spec, not when the first pod reads it."""
        if self.cache and self.cache.startswith("s3://"):
            from kubetune.trainer.api.errors import SpecError
            from kubetune.trainer.api.uri import S3Uri

            try:
                S3Uri.parse(self.cache, "data.cache")
            except SpecError as err:
                raise ValueError(f"cache: {err.problem.rstrip('.')}") from None
        return self


class LoraSpec(SpecModel):
    """LoRA adapter settings (PEFT)."""

    rank: PositiveInt = 8
    alpha: PositiveFloat | None = None
    """Scaling numerator; default 2 x rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapted layer's input. 0 (PEFT's and LlamaFactory's default) lets PEFT skip
    the dropout: no copy of every adapted layer's input, which was ~9% of a LoRA step in the CPU
    profile of `bench/throughput.py`'s model, and less activation memory. 0.05-0.1 regularises a
    small dataset trained for many epochs."""
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
    targetParameters: list[str] = Field(default_factory=list)
    """Parameters (not modules) to adapt, by name suffix: the 3-D expert weights of an MoE model,
    which are not linear layers (e.g. `experts.gate_up_proj`, `experts.down_proj` for Mixtral and
    Qwen-MoE); PEFT's `target_parameters`. `targetModules: [all-linear]` (the default) already
    reaches them (PEFT adds the experts itself); with named modules, experts train only when
    listed here. PEFT's parameter
    adapters take no dropout: with these, `dropout` defaults to 0 (a non-zero one is refused)."""

    @model_validator(mode="after")
    def _parameter_adapters_take_no_dropout(self) -> LoraSpec:
        if self.targetParameters and "dropout" in self.model_fields_set and self.dropout > 0:
            raise ValueError("lora.targetParameters adapts weights through PEFT's parameter wrappers, which "
                             "take no dropout: set lora.dropout to 0 (or leave it unset)")
        return self

    @property
    def effective_dropout(self) -> float:
        """`dropout`, or 0 with `targetParameters` when it was left unset."""
        return 0.0 if self.targetParameters and "dropout" not in self.model_fields_set else self.dropout


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


class VisionSpec(SpecModel):
    """Vision-language models (a model whose config has a `vision_config`: LLaVA, Qwen2-VL, ...),
    trained with `stage: sft` on conversations whose turns hold `<image>` placeholders and whose
    `images` list the pictures. The language model is trained by `method` (LoRA adapters on its
    layers by default); the vision tower and the projector that maps its features into the
    language model stay frozen unless asked for here, as LlamaFactory and LLaVA's recipes do."""

    trainProjector: bool = False
    """Train the multimodal projector too (in full: under LoRA it is saved with the adapter).
    LLaVA's pretraining stage trains only this; worth turning on when the vision features are new
    to the language model."""
    trainTower: bool = False
    """Train the vision encoder too (LoRA adapters on its linear layers under `lora`/`qlora`, every
    weight under `full`). Costs memory and rarely helps on small data: off by default."""
    maxImages: PositiveInt = 8
    """Images one example may carry; an example with more is refused with its row named."""
    maxImageMb: PositiveFloat = 20.0
    """Largest image file read (MB), from disk or `s3://`: a bound against a dataset (or a request
    to `kubetune serve`) that points at something that is not a picture."""


class MoeSpec(SpecModel):
    """Mixture-of-experts models (Mixtral, Qwen-MoE, ...): the router's load-balancing loss. Used
    when the model has routed experts; under ZeRO-3 their MoE blocks are always gathered whole
    (DeepSpeed leaf modules)."""

    routerAuxLoss: bool = True
    """Add the router's load-balancing loss to the training loss (the model's `output_router_logits`),
    logged as `aux_loss` in metrics.jsonl: without it a fine-tune can collapse the routing onto a
    few experts. `pt` and `sft`; the preference and RL stages train as the model's config says."""
    auxLossCoef: float | None = Field(None, ge=0)
    """Weight of the load-balancing loss. Default: the model's `router_aux_loss_coef` (0.02 for
    Mixtral, 0.001 for Qwen-MoE)."""


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


PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]


class DpoSpec(SpecModel):
    """Preference optimisation for `stage: dpo` (TRL's DPOTrainer)."""

    lossType: PreferenceLoss = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `hinge` (SLiC), `robust` (noisy labels, uses `labelSmoothing`),
    `simpo` (reference-free: length-normalised log-likelihood margin minus `simpoGamma`), `orpo`
    (reference-free odds-ratio loss plus the chosen answer's NLL; `beta` is ORPO's lambda)."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL penalty (IPO: the regularisation tau). SimPO wants ~2."""
    labelSmoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed probability that a preference label is flipped (cDPO / robust DPO)."""
    simpoGamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin gamma (`lossType: simpo` only)."""
    rpoAlpha: float = Field(1.0, ge=0)
    """Weight of the chosen answer's mean token NLL added to the preference loss (RPO; TRL's
    `rpo_alpha`, LlamaFactory's `pref_ftx`): the policy keeps generating the chosen answers while
    it learns to prefer them (without it, preference accuracy can reach 100% while greedy answers
    stop matching). 0: the plain loss of `lossType`. `orpo` has this term built in and ignores it."""
    referenceModel: str | None = None
    """Reference policy (path or `s3://` URI). Default: the model being trained, as it starts; with
    LoRA that is the base with adapters disabled, so no second copy is loaded."""


class KtoSpec(SpecModel):
    """Kahneman-Tversky optimisation for `stage: kto` (TRL's KTOTrainer) on unpaired judgements."""

    lossType: Literal["kto", "apo_zero_unpaired"] = "kto"
    """`kto` (the KTO paper's loss, with a batch-level KL estimate) or `apo_zero_unpaired`."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL penalty towards the reference policy."""
    desirableWeight: PositiveFloat = 1.0
    """Weight of the losses of desirable answers (raise it when they are the minority)."""
    undesirableWeight: PositiveFloat = 1.0
    """Weight of the losses of undesirable answers."""


class RewardSpec(SpecModel):
    """Where `ppo`, `raft` and `grpo` get rewards: a trained reward model or a Python function."""

    model: str | None = None
    """A reward model: the output of an `rm` stage (a directory, `s3://` URI, or hub id of a
    sequence-classification model, or a LoRA adapter on one)."""
    function: str | None = None
    """A reward function `module:function` (or `path/to/file.py:function`) called as
    `function(prompts, completions, **columns) -> list[float]`; `columns` holds `reference` (the
    dataset's answer, if any). For verifiable tasks (exact match, regex, unit tests)."""
    batchSize: PositiveInt = 16
    """Sequences per reward-model forward pass."""


class GenerationSpec(SpecModel):
    """How `ppo`, `raft` and `grpo` sample answers from the policy being trained."""

    maxNewTokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    topP: float = Field(1.0, gt=0, le=1)
    topK: NonNegativeInt = 0
    """Sample from the k most likely tokens only (0: no limit)."""
    samplesPerPrompt: PositiveInt = 4
    """Answers sampled per prompt: RAFT's K, GRPO's group size; PPO trains on all of them."""


class PpoSpec(SpecModel):
    """PPO for `stage: ppo`: clipped policy updates against a learned value head, with a per-token
    KL penalty towards the reference policy (the model as training starts)."""

    epochs: PositiveInt = 2
    """Optimisation passes over each batch of rollouts (each pass is one optimizer step)."""
    clipRange: PositiveFloat = 0.2
    """PPO's epsilon: how far the probability ratio may move per update."""
    valueClipRange: PositiveFloat = 0.2
    valueCoef: PositiveFloat = 0.1
    """Weight of the value-head loss in the total loss."""
    klCoef: float = Field(0.05, ge=0)
    """Per-token KL penalty coefficient (reward shaping against the reference policy)."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whitenAdvantages: bool = True


class RaftSpec(SpecModel):
    """RAFT (reward-ranked fine-tuning, Dong et al. 2023) for `stage: raft`. Each optimizer step is
    one iteration: sample `generation.samplesPerPrompt` answers for a batch of prompts, keep the best,
    and take a supervised step on them."""

    keep: Literal["best", "topFraction"] = "best"
    """`best`: the best answer per prompt; `topFraction`: the best `topFraction` of all answers of
    the batch."""
    topFraction: float = Field(0.25, gt=0, le=1)
    minReward: float | None = None
    """An answer scoring below it is never trained on, even as its prompt's best. Unset: it must
    score above the mean reward of the iteration's samples (an all-zero batch trains nothing)."""


class GrpoSpec(SpecModel):
    """GRPO for `stage: grpo` (TRL's GRPOTrainer): group-relative advantages, no value model."""

    beta: float = Field(0.0, ge=0)
    """KL penalty towards the reference policy (0: none, no reference forward pass)."""
    lossType: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    epsilon: PositiveFloat = 0.2
    """Clipping range of the probability ratio."""
    iterations: PositiveInt = 1
    """Optimisation passes over each batch of generations (TRL's num_iterations)."""


class TrainSpec(SpecModel):
    """Optimisation hyper-parameters."""

    epochs: PositiveFloat = 3.0
    maxSteps: PositiveInt | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batchSize: PositiveInt = 4
    """Sequences per device per step."""
    gradientAccumulation: PositiveInt = 1
    learningRate: PositiveFloat = 2e-4
    scheduler: Scheduler | None = None
    """Learning-rate decay from `learningRate` over the run. Default: `linear` for `pt` and `sft`
    (transformers' and TRL's default: at the same peak rate and budget, `cosine` cost held-out exact
    match on the demo task, bench/quality.py), `cosine` for the other stages."""
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
    logitsOnLabels: bool = True
    """`pt`, `sft`, `dpo`: run the output layer and the loss only at positions that carry a label
    (in SFT and DPO the answers, not the prompt or padding): the same loss and gradients as full
    logits, without the (tokens x vocabulary) logits of the prompt. Off: the model's own loss over
    every position (`dpo`: TRL's choice, every position on devices without Triton)."""
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


class PipelineStep(SpecModel):
    """One stage of a pipeline. The blocks given here replace the top-level ones for this stage;
    `model.path` defaults to the previous stage's output, `reward.model` to the latest `rm` stage's."""

    stage: Stage
    name: str | None = None
    """Output subdirectory name; default `<index>-<stage>` (e.g. `1-dpo`)."""
    method: Method | None = None
    data: DataSpec | None = None
    lora: LoraSpec | None = None
    train: TrainSpec | None = None
    eval: EvalSpec | None = None
    dpo: DpoSpec | None = None
    kto: KtoSpec | None = None
    reward: RewardSpec | None = None
    generation: GenerationSpec | None = None
    ppo: PpoSpec | None = None
    raft: RaftSpec | None = None
    grpo: GrpoSpec | None = None


class TrainingSpec(SpecModel):
    """A complete fine-tuning run. The only required blocks are `model` and `data`."""

    name: str | None = None
    """Run name; a FineTuneJob's metadata.name is used when unset."""
    stage: Stage = "sft"
    """`pt`: continued pretraining on plain text (packed); `sft`: instruction tuning on
    conversations with the prompt masked from the loss; `rm`: a reward model on preference pairs;
    `dpo` (and variants), `kto`: preference optimisation on judged answers; `ppo`, `raft`, `grpo`:
    reinforcement learning on the policy's own answers, scored by `reward`."""
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
    moe: MoeSpec = Field(default_factory=MoeSpec)
    """Router load-balancing loss of mixture-of-experts models."""
    vision: VisionSpec = Field(default_factory=VisionSpec)
    """Vision-language models: which of the vision tower and projector train, image limits. Used
    when the model has a vision encoder (see docs: Training > Multimodal)."""
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
    kto: KtoSpec = Field(default_factory=KtoSpec)
    """Loss variant and weights, used when `stage` is `kto`."""
    reward: RewardSpec = Field(default_factory=RewardSpec)
    """Reward model or function, used when `stage` is `ppo`, `raft` or `grpo`."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Sampling of answers, used when `stage` is `ppo`, `raft` or `grpo`."""
    ppo: PpoSpec = Field(default_factory=PpoSpec)
    """PPO settings, used when `stage` is `ppo`."""
    raft: RaftSpec = Field(default_factory=RaftSpec)
    """RAFT settings, used when `stage` is `raft`."""
    grpo: GrpoSpec = Field(default_factory=GrpoSpec)
    """GRPO settings, used when `stage` is `grpo`."""
    pipeline: list[PipelineStep] = Field(default_factory=list)
    """Run several stages in order from one spec (e.g. sft, then rm, then ppo): each step's output
    is the next step's model. The top-level blocks are every step's defaults; `stage` is ignored."""

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
        if self.stage not in ("pt", "sft") and self.data.streaming:
            raise ValueError(f"data.streaming is not supported for stage {self.stage}: set it to false")
        if self.stage in ROLLOUT_STAGES and not (self.reward.model or self.reward.function) and not self.pipeline:
            raise ValueError(
                f"stage {self.stage} needs a reward: set reward.function (module:function) or "
                "reward.model (the output of an rm stage)"
            )
        if self.reward.model and self.reward.function:
            raise ValueError("set reward.model or reward.function, not both")
        if self.model.shiftAttention and self.model.attnImplementation == "flash_attention_2":
            raise ValueError(
                "model.shiftAttention gives each group its own mask, which flash_attention_2 cannot "
                "take: set model.attnImplementation to sdpa (or auto), or model.shiftAttention to false"
            )
        if self.model.shiftAttention and self.stage == "rm":
            raise ValueError("model.shiftAttention trains causal language models (pt, sft, dpo, ...), not a "
                             "reward model: set it to false for stage rm")
        if self.stage in ROLLOUT_STAGES and self.distributed.deepspeed and self.distributed.deepspeed.stage == 3:
            raise ValueError(
                f"stage {self.stage} generates with the policy on each rank, which ZeRO-3 partitions: "
                "use distributed.deepspeed.stage 2 (or 0/1)"
            )
        if self.pipeline:
            self.pipeline_specs()  # each step must be a valid spec on its own
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
    def padding_free_enabled(self) -> bool:
        if self.stage not in ("pt", "sft"):
            return False  # preference pairs and RL batches are collated by their TRL trainers
        return self.data.paddingFree if self.data.paddingFree is not None else not self.model.trustRemoteCode

    @property
    def output_path(self) -> str:
        return self.output.path or f"outputs/{self.name or 'kubetune'}"

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else 2.0 * self.lora.rank

    def pipeline_specs(self) -> list[TrainingSpec]:
        """The pipeline's steps as complete specs, in order. Step i writes to
        `<output>/<step name>` and, unless it names its own model, starts from step i-1's output;
        rollout stages score with the latest earlier `rm` step's output unless given a reward."""
        specs: list[TrainingSpec] = []
        base = self.model_dump(mode="json", exclude={"pipeline", "name", "output"})
        previous: str | None = None
        reward_model: str | None = None
        for index, step in enumerate(self.pipeline):
            name = step.name or f"{index}-{step.stage}"
            doc = {**base, **step.model_dump(mode="json", exclude_none=True, exclude={"name"})}
            doc["name"] = f"{self.name}-{name}" if self.name else name
            doc["output"] = {**self.output.model_dump(mode="json"), "path": f"{self.output_path.rstrip('/')}/{name}"}
            if previous is not None:
                doc["model"] = {**doc["model"], "path": previous}
            if step.stage in ROLLOUT_STAGES and step.reward is None and reward_model is not None:
                doc["reward"] = {**doc["reward"], "model": reward_model, "function": None}
            try:
                spec = TrainingSpec.model_validate(doc)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first.get("loc", ()))
                message = str(first["msg"]).removeprefix("Value error, ")
                raise ValueError(f"pipeline[{index}] (stage {step.stage}): {where + ': ' if where else ''}{message}") from None
            if step.stage == "rm":
                reward_model = spec.output_path
            else:
                previous = spec.output_path
            specs.append(spec)
        return specs

    def to_document(self) -> dict[str, Any]:
        """The spec as it is written in YAML: camelCase keys, every default filled in, those derived
        from other fields too (`data.packing`, `data.paddingFree`), so the saved spec says what ran."""
        document = self.model_dump(mode="json")
        if not self.pipeline:  # each step derives its own
            document["data"]["packing"] = self.packing_enabled
            document["data"]["paddingFree"] = self.padding_free_enabled
        return document
