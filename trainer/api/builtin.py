"""The `builtin:` model catalogue: which `builtin:NAME` model paths exist and their shapes.

A spec-level fact (the spec, `kubetune estimate` and the operator's admission check name these
models without building them); `kubetune.trainer.train.models.builtin` builds them.
"""

from __future__ import annotations

PREFIX = "builtin:"
BUILTIN_VERSION = "2"
VERSIONS = {"tiny-llava": "3"}
"""Models rebuilt since BUILTIN_VERSION: tiny-llava 3 stores its vision tower in the hub's layout
(`vision_tower.vision_model.*`, which vLLM reads; see `train.models.hub_layout`)."""

TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 1024,
}

BUILTINS = {
    "tiny-llama": TINY_LLAMA,
    # A LLaVA-architecture vision-language model: the tiny Llama above as its language model, a
    # 2-layer CLIP vision encoder on 32x32 pictures (16 patches of 8x8, so 16 image tokens) and
    # LLaVA's two-layer projector. Its tokenizer also knows the words of the shapes demo.
    "tiny-llava": {
        **TINY_LLAMA,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    },
    # A Qwen2-VL-architecture vision-language model: the tiny Llama's sizes in Qwen2's language
    # model with multimodal RoPE (3-D positions for image tokens), a 2-layer Qwen2-VL vision
    # encoder on 64x64 pictures (8x8 patches, 2x2 merged by its MLP merger: 16 image tokens).
    "tiny-qwen2-vl": {
        **TINY_LLAMA,
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": 2,
            "embed_dim": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "image_size": 64,
        },
    },
    # A Mixtral-architecture mixture of experts: the tiny Llama's attention, and in each layer 4
    # experts of which every token goes through 2 (for the MoE tests: ZeRO-3 leaf modules, the
    # router's load-balancing loss, LoRA on expert weights, active vs total parameters).
    "tiny-mixtral": {
        "model_type": "mixtral",
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "vocab_size": 1024,
    },
}


def builtin_name(path: str) -> str | None:
    """`tiny-llama` for `builtin:tiny-llama`; None for a path that does not name a builtin model."""
    name = path[len(PREFIX):] if path.startswith(PREFIX) else None
    return name if name in BUILTINS else None


def built_dir_name(name: str) -> str:
    """The cache directory name of a built builtin model: a new version is built afresh."""
    return f"{name}-v{VERSIONS.get(name, BUILTIN_VERSION)}"
