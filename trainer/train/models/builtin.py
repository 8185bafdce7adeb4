"""`builtin:` models: tiny Llama-architecture models built locally, deterministically.

They make the quickstart and the test suite work on a machine that cannot download from a hub.
`builtin:tiny-llama` is a 2-layer Llama (head size 64, so vLLM's CPU kernels accept it) with a
byte-level BPE tokenizer trained on the demo corpus, whose chat template is kubetune's `default`
(set explicitly, as a chat model's tokenizer ships its own: the demo trains and chats on
conversations, and a tokenizer without a template is refused for them). `builtin:tiny-llava` is a
LLaVA-architecture vision-language model around the same tiny Llama (a 2-layer CLIP encoder on
32x32 pictures, LLaVA's projector) with its processor, for the multimodal demo and tests, saved in
the hub's weight layout (which vLLM loads too: `hub_layout`); `builtin:tiny-qwen2-vl` is the same
language model in Qwen2-VL's architecture (multimodal RoPE, Qwen2-VL's encoder and merger, its
`<|vision_start|><|image_pad|><|vision_end|>` image tokens). Each is
built once into the cache directory and reused; concurrent builders (torchrun ranks) race safely
through an atomic rename.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kubetune.trainer.api.builtin import BUILTINS, PREFIX, built_dir_name
from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.artifacts.cache import cache_root as storage_cache_root

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def cache_root() -> Path:
    """The local cache the builtin models are built into: the storage cache's root (the same
    directory `kubetune estimate` reads a built model's config.json from)."""
    return storage_cache_root()


def is_builtin(path: str) -> bool:
    return path.startswith(PREFIX)


def resolve_builtin(path: str, field: str = "model.path") -> Path:
    """Return the local directory of a builtin model, building it on first use."""
    name = path[len(PREFIX):]
    if name not in BUILTINS:
        raise SpecError(field, f"unknown builtin model {name!r}.", f"use one of: {', '.join(PREFIX + n for n in BUILTINS)}.")
    target = cache_root() / "builtin" / built_dir_name(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        shape = dict(BUILTINS[name])
        vision = shape.pop("vision_config", None)
        if vision is not None and vision["model_type"] == "qwen2_vl_vision":
            build_tiny_qwen2_vl(staging, vision_config=vision, **shape)
        elif vision is not None:
            build_tiny_llava(staging, vision_config=vision, **shape)
        else:
            build_tiny_llama(staging, **shape)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical (deterministic build).
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (any input text encodes) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_llama(directory: str | Path, *, vocab_size: int, seed: int = 0, chat_template: str | None = "default",
                     **config_kwargs) -> Path:
    """Build and save a randomly initialised tiny Llama (or, with `model_type: mixtral`, a Mixtral
    MoE) and its tokenizer into `directory`; `chat_template` (a built-in name, or None for a base
    model without one) goes with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.train.demo import demo_corpus

    directory = Path(directory)
    tokenizer = train_tokenizer(demo_corpus(), vocab_size)
    tokenizer.model_max_length = config_kwargs["max_position_embeddings"]
    if chat_template is not None:
        from kubetune.trainer.train.data.templates import TEMPLATES

        tokenizer.chat_template = TEMPLATES[chat_template]
    config = AutoConfig.for_model(
        config_kwargs.pop("model_type", "llama"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


IMAGE_TOKEN = "<image>"


def vision_tokenizer(vocab_size: int, image_tokens: list[str], max_length: int):
    """The tiny vision-language models' tokenizer: trained on the demo and shapes words, with the
    model family's image tokens as special tokens and kubetune's `default` chat template."""
    from kubetune.trainer.train.data.templates import TEMPLATES
    from kubetune.trainer.train.demo import demo_corpus
    from kubetune.trainer.train.shapes import shapes_corpus

    tokenizer = train_tokenizer(demo_corpus() + shapes_corpus(), vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": image_tokens})
    tokenizer.model_max_length = max_length
    tokenizer.chat_template = TEMPLATES["default"]
    return tokenizer


def build_tiny_llava(directory: str | Path, *, vocab_size: int, vision_config: dict, seed: int = 0, **text_kwargs) -> Path:
    """Build and save a randomly initialised tiny LLaVA and its processor into `directory`: the
    tokenizer (demo and shapes words, plus the `<image>` token) with kubetune's `default` chat
    template, a CLIP image processor sized to the encoder, and LLaVA's processor, which expands
    each `<image>` into one token per patch."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from kubetune.trainer.train.data.templates import TEMPLATES
    from kubetune.trainer.train.models.hub_layout import write_hub_layout

    directory = Path(directory)
    tokenizer = vision_tokenizer(vocab_size, [IMAGE_TOKEN], text_kwargs["max_position_embeddings"])
    vision = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **text_kwargs)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # "default" drops the encoder's CLS feature: one image token per patch (num_additional_image_tokens
    # says the encoder adds that one, so the processor counts patches + 1 - 1).
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               image_token=IMAGE_TOKEN, chat_template=TEMPLATES["default"])
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    write_hub_layout(directory)  # built from a config, transformers saves its own layout; vLLM reads the hub's
    processor.save_pretrained(directory)
    return directory


QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_tiny_qwen2_vl(directory: str | Path, *, vocab_size: int, vision_config: dict, seed: int = 0,
                        **text_kwargs) -> Path:
    """Build and save a randomly initialised tiny Qwen2-VL and its processor into `directory`:
    the tiny Llama's tokenizer plus Qwen2-VL's vision tokens, kubetune's `default` chat template,
    Qwen2-VL's image processor at a fixed resolution (`image_size` squared pixels: every picture
    gives the same 16 tokens), and multimodal RoPE sections that fill the 64-wide heads."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from kubetune.trainer.train.data.templates import TEMPLATES

    directory = Path(directory)
    tokenizer = vision_tokenizer(vocab_size, list(QWEN2_VL_TOKENS), text_kwargs["max_position_embeddings"])
    vision = {k: v for k, v in vision_config.items() if k not in ("model_type", "image_size")}
    head_dim = text_kwargs["hidden_size"] // text_kwargs["num_attention_heads"]
    sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen2-VL's 16/24/24 of 64 pairs
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN2_VL_TOKENS, strict=True)}
    text = {**text_kwargs, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "rope_scaling": {"type": "mrope", "mrope_section": sections}}
    config = Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": text_kwargs["hidden_size"]},
                           tie_word_embeddings=False, **ids)
    pixels = vision_config["image_size"] ** 2
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=vision["patch_size"],
                                            merge_size=vision["spatial_merge_size"],
                                            temporal_patch_size=vision["temporal_patch_size"])
    video_processor = Qwen2VLVideoProcessor(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                            temporal_patch_size=vision["temporal_patch_size"])  # required, unused
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 chat_template=TEMPLATES["default"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
