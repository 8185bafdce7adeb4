"""Choosing and loading an engine: the one place that knows every backend (the backends import only
the interface in `engine.py`, so adding one never makes a cycle)."""

from __future__ import annotations

from typing import Any

from kubetune.trainer.serve.engine import Engine, pick_engine


def create_engine(model: str, *, engine: str = "auto", adapters: list | None = None, **kwargs: Any) -> Engine:
    """Load `model` (plus adapters) into the chosen engine. kwargs go to the engine's loader."""
    choice = pick_engine(engine)
    if choice == "vllm":
        from kubetune.trainer.serve.vllm_engine import VLLMEngine

        return VLLMEngine.load(model, adapters=adapters, **kwargs)
    from kubetune.trainer.serve.transformers_engine import TransformersEngine

    return TransformersEngine.load(model, adapters=adapters, **kwargs)
