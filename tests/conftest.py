"""Shared fixtures. Tests build their tiny model locally; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep builtin models and downloads out of the user's ~/.cache (one per test session)."""
    cache = Path(os.environ.get("KUBETUNE_TEST_CACHE") or tmp_path_factory.mktemp("kubetune-cache"))
    os.environ["KUBETUNE_CACHE"] = str(cache)
    # Subprocesses run `python -m kubetune...` from the repository root, where the `operator/`
    # folder would shadow the standard library module; safe-path mode keeps cwd off sys.path.
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(_isolated_cache: Path) -> Path:
    """The `builtin:tiny-llama` model directory (a 2-layer Llama and its BPE tokenizer)."""
    from kubetune.trainer.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
