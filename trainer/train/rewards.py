"""Reward sources for the stages that score their own generations (`ppo`, `raft`, `grpo`).

One interface for both kinds, so a stage never cares which one the spec named:

    scorer(prompts: list[str], completions: list[str], **columns) -> list[float]

- `reward.function: module:function` (or `path/to/file.py:function`): a Python function with that
  very signature; `columns` carries `reference` (the dataset's answer for the prompt, or None)
  and should be accepted as `**kwargs`. This is TRL's reward-function convention, so the same
  function also works with TRL directly. Verifiable tasks (exact match, a regex, unit tests)
  need no reward model at all.
- `reward.model`: a reward model as the `rm` stage saves it (a sequence-classification model,
  or a LoRA adapter on one), by path, `s3://` URI or hub id. It scores the prompt text followed
  by the completion, exactly as the `rm` stage scored chosen/rejected answers.

Model sharing (LlamaFactory's): when the policy is trained with LoRA and the reward model is a
LoRA adapter on the same base, the reward adapter is loaded into the policy's own PeftModel as a
second, frozen adapter (plus its one-row score head), so one copy of the base serves as policy,
reference (adapters off) and reward model. Otherwise the reward model is loaded on its own.

`preflight_reward` checks the source before any model is loaded, so a typo fails in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import RewardSpec, StorageSpec, TrainingSpec

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def import_function(reference: str, field: str = "reward.function") -> RewardFn:
    """`module:function` or `file.py:function` -> the callable, or a SpecError saying why not."""
    module_name, sep, attr = reference.rpartition(":")
    if not sep or not module_name or not attr:
        raise SpecError(field, f"{reference!r} is not `module:function`.",
                        "write it as `mypackage.rewards:exact_match` or `rewards.py:exact_match`.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise SpecError(field, f"the file {module_name!r} does not exist.", "give a path relative to where the run starts, or an importable module.")
            loaded = importlib.util.spec_from_file_location(f"kubetune_reward_{path.stem}", path)
            assert loaded is not None and loaded.loader is not None
            module = importlib.util.module_from_spec(loaded)
            sys.modules[loaded.name] = module
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except SpecError:
        raise
    except Exception as exc:  # the user's module may fail in any way while importing
        raise SpecError(field, f"importing {module_name!r} failed ({type(exc).__name__}: {exc}).",
                        "make the module importable where the trainer runs (installed, or on PYTHONPATH, or a .py path).") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise SpecError(field, f"{module_name!r} has no function {attr!r}.", "check the name after the colon.")
    try:
        inspect.signature(function).bind(["p"], ["c"], reference=[None])
    except TypeError:
        raise SpecError(field, f"{reference} cannot be called as function(prompts, completions, reference=..., **columns).",
                        "give it the signature `def reward(prompts, completions, **kwargs) -> list[float]`.") from None
    return function


class FunctionScorer:
    """A reward function, with its return value checked (one finite float per completion)."""

    def __init__(self, function: RewardFn, name: str):
        self.function = function
        self.__name__ = name  # TRL logs each reward function under its name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        scores = self.function(prompts, completions, **columns)
        values = [float(x) for x in scores]
        if len(values) != len(completions):
            raise ValueError(f"reward function {self.__name__} returned {len(values)} scores for {len(completions)} completions")
        return values


def scored_batches(tokenizer: Any, prompts: list[str], completions: list[str], batch_size: int, device: Any):
    """Prompt + completion + eos, tokenized in right-padded batches: what the `rm` stage scored
    (sequence classification reads the last non-pad token)."""
    eos = tokenizer.eos_token or ""
    texts = [p + c + (eos if eos and not c.endswith(eos) else "") for p, c in zip(prompts, completions, strict=True)]
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True, padding_side="right",
                        return_tensors="pt").to(device)


class ModelScorer:
    """A reward model (the `rm` stage's output): the score of prompt + completion + eos."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        import torch

        scores: list[float] = []
        device = next(self.model.parameters()).device
        for batch in scored_batches(self.tokenizer, prompts, completions, self.batch_size, device):
            with torch.no_grad():
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores


def reward_model_location(spec: TrainingSpec) -> str:
    from kubetune.trainer.train.models.locations import resolve_location

    assert spec.reward.model
    location = resolve_location(spec.reward.model, spec.storage, "reward.model")
    path = Path(location)
    if path.exists() and not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise SpecError("reward.model", f"{spec.reward.model!r} holds neither a model (config.json) nor an adapter.",
                        "point it at the output of an rm stage.")
    return location


def preflight_reward(spec: TrainingSpec) -> None:
    """Fail fast: the function imports and has the right shape; the model location exists."""
    if spec.reward.function:
        import_function(spec.reward.function)
    elif spec.reward.model:
        reward_model_location(spec)
    else:
        raise SpecError("reward", f"stage {spec.stage} needs a reward.", "set reward.function or reward.model.")


REWARD_ADAPTER = "reward"


class SharedAdapterScorer:
    """A LoRA reward model living in the policy's PeftModel as the frozen adapter `reward`: scoring
    switches the active adapter, runs the decoder, and applies the reward model's score head to
    the last token's hidden state (what *ForSequenceClassification does)."""

    def __init__(self, policy: Any, adapter_dir: Path, tokenizer: Any, batch_size: int, name: str):
        import torch
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        head_keys = [k for k in weights if k.split(".")[-2] == "score"]
        if len(head_keys) != 1:
            raise SpecError("reward.model", f"the adapter in {str(adapter_dir)!r} carries no score head.",
                            "train the reward model with stage: rm (it saves the head with the adapter).")
        head_weight = weights.pop(head_keys[0])
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                          lora_dropout=0.0, bias=config.get("bias", "none"), use_rslora=config.get("use_rslora", False),
                          use_dora=config.get("use_dora", False), task_type="CAUSAL_LM")
        policy.add_adapter(REWARD_ADAPTER, lora)
        set_peft_model_state_dict(policy, weights, adapter_name=REWARD_ADAPTER)
        policy.set_requires_grad(REWARD_ADAPTER, requires_grad=False)
        device = next(policy.parameters()).device
        self.head = torch.nn.Linear(head_weight.shape[1], 1, bias=False).to(device=device, dtype=torch.float32)
        self.head.weight.data.copy_(head_weight.float())
        self.head.requires_grad_(False)
        self.policy = policy
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        import torch

        policy = self.policy
        active = policy.active_adapter
        decoder = policy.get_base_model().model  # the transformer without the LM head
        scores: list[float] = []
        was_training = policy.training
        policy.eval()
        policy.set_adapter(REWARD_ADAPTER, inference_mode=True)
        try:
            for batch in scored_batches(self.tokenizer, prompts, completions, self.batch_size, self.head.weight.device):
                with torch.no_grad():
                    hidden = decoder(**batch).last_hidden_state
                last = batch["attention_mask"].sum(dim=1) - 1
                scores.extend(self.head(hidden[torch.arange(len(last)), last].float())[:, 0].tolist())
        finally:
            policy.set_adapter(active)
            policy.set_requires_grad(REWARD_ADAPTER, requires_grad=False)
            policy.train(was_training)
        return scores


def shares_base(spec: TrainingSpec, location: str, policy: Any) -> bool:
    """Whether the reward model at `location` is a LoRA adapter on the policy's own base."""
    from peft import PeftModel

    path = Path(location)
    if policy is None or not isinstance(policy, PeftModel) or not (path / "adapter_config.json").is_file():
        return False
    from kubetune.trainer.artifacts.adapters import adapter_base

    try:
        return adapter_base(path)[0] == spec.model.path
    except SpecError:  # an adapter that names no base: loaded on its own, where that is reported
        return False


def load_scorer(spec: TrainingSpec, device: Any = None, policy: Any = None) -> FunctionScorer | ModelScorer | SharedAdapterScorer:
    """The spec's reward source as a scorer, models loaded in eval mode on `device`. With `policy`
    (a LoRA PeftModel) a reward adapter on the same base is shared, not loaded twice."""
    reward: RewardSpec = spec.reward
    if reward.function:
        return FunctionScorer(import_function(reward.function), reward.function.rpartition(":")[2])
    location = reward_model_location(spec)
    if shares_base(spec, location, policy):
        from transformers import AutoTokenizer

        log.info("reward model %s shares the policy's base: loaded as its adapter %r", location, REWARD_ADAPTER)
        tokenizer = AutoTokenizer.from_pretrained(location)
        return SharedAdapterScorer(policy, Path(location), tokenizer, reward.batchSize, name=Path(location).name or "reward_model")
    model, tokenizer = load_reward_model(location, spec.storage)
    if device is not None:
        model.to(device)
    return ModelScorer(model, tokenizer, reward.batchSize, name=Path(location).name or "reward_model")


def load_reward_model(location: str, storage: StorageSpec) -> tuple[Any, Any]:
    """A sequence-classification model and its tokenizer; a LoRA reward model is attached to its
    base and merged (its trained score head comes with the adapter's saved modules)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune.trainer.artifacts.adapters import adapter_base
    from kubetune.trainer.train.models.locations import resolve_model_location

    path = Path(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base_location = resolve_model_location(adapter_base(path)[0], storage, "reward.model")
            model = AutoModelForSequenceClassification.from_pretrained(base_location, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(location, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise SpecError("reward.model", f"no reward model could be loaded from {location!r} ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}).",
                        "point it at the output of an rm stage (a sequence-classification model or adapter).") from None
    if model.config.num_labels != 1:
        raise SpecError("reward.model", f"{location!r} has {model.config.num_labels} output labels, a reward model has one.",
                        "train one with stage: rm.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    log.info("reward model: %s", location)
    return model, tokenizer


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts. The
    RAFT paper's diversity measure: it falls when a policy collapses onto a few answers."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0
