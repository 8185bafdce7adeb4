"""A model's shape for the memory estimate, read from where the model lies on this machine.

`kubetune.trainer.api.estimate` is pure arithmetic and reads no files; this module finds the
`config.json` it needs: a built `builtin:` model's in the local cache (its tokenizer's real
vocabulary, <= the nominal one), or a local model directory's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.trainer.api.builtin import built_dir_name, builtin_name
from kubetune.trainer.api.estimate import ModelShape, shape_for_path
from kubetune.trainer.artifacts.cache import cache_root


def resolve_shape(model_path: str, params: str | int | None = None, *, read_local: bool = True) -> ModelShape | None:
    """The model's shape: a local `config.json` (unless `read_local` is false: the operator's
    disk is not the pod's), a builtin model, a known architecture named in the path; `params`
    overrides the parameter count (and alone gives a Llama-like shape). None when nothing is
    known (a private S3/hub model without `params`)."""
    return shape_for_path(model_path, params, config=local_config(model_path, read_local=read_local))


def local_config(model_path: str, *, read_local: bool = True) -> dict[str, Any] | None:
    """The model's `config.json` on this machine, if there is one: a built builtin model's (read
    whatever `read_local` says), else a local directory's (only when `read_local`)."""
    builtin = builtin_name(model_path)
    if builtin is not None:
        built = cache_root() / "builtin" / built_dir_name(builtin) / "config.json"
        return json.loads(built.read_text()) if built.is_file() else None
    local = Path(model_path).expanduser() / "config.json"
    if read_local and "://" not in model_path and local.is_file():
        return json.loads(local.read_text())
    return None
