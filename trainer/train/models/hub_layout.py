"""Saved weights in the hub's layout, the one every loader reads (vLLM included).

transformers 5 renames some checkpoints' keys while it loads them (its conversion mapping). A CLIP
vision tower, for one, is stored on the hub as `vision_tower.vision_model.encoder...`, while
transformers' own module has no `vision_model` level (`PrefixChange(prefix_to_remove=
"vision_model")` for `CLIPVisionModel`). On save transformers undoes such a prefix change only for
a model it loaded from a checkpoint that had the prefix; a model built from a config (the builtin
tiny LLaVA) or loaded from a checkpoint already in its own layout is saved as its modules are
named: `vision_tower.embeddings...`. transformers reads either layout; vLLM maps the hub's names
onto its own modules and refuses the other ("no module or parameter named
'vision_tower.embeddings'").

`write_hub_layout` renames a saved model's keys to the hub's: the architecture's prefix changes,
read from transformers' own mapping (nothing hard-coded here), applied backwards, as transformers
does when it resaves a hub checkpoint. Keys already in the hub's layout stay as they are, and
architectures without a prefix change (Llama, Mixtral, ...) are not touched.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hub_renamings(directory: str | Path) -> list[Any]:
    """The renamings from transformers' saved layout to the hub's for the model saved in
    `directory`: its architecture's prefix changes, reversed (empty when it has none, or when
    transformers does not know the architecture: remote code keeps its own names)."""
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        log.warning("keeping the saved weight names of %s: its config does not load (%s)", directory, exc)
        return []
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        return []
    # The module tree only: no memory, no initialisation. The class itself, not `_from_config`:
    # under DeepSpeed ZeRO-3, `_from_config` builds inside `deepspeed.zero.Init`, whose collective
    # broadcasts would wait forever for the other ranks (only rank 0 saves the final model).
    with torch.device("meta"):
        model = model_class(config)
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    return [t.reverse_transform() for t in reversed(transforms) if isinstance(t, PrefixChange)]


def write_hub_layout(directory: str | Path) -> int:
    """Rename the weights saved in `directory` (model.safetensors, or the shards its index names,
    and the index itself) to the hub's layout, in place. Returns how many keys were renamed."""
    from transformers.core_model_loading import apply_renamings

    directory = Path(directory)
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else [SINGLE_FILE]
    if not all((directory / name).is_file() for name in files):
        return 0  # an adapter, or no weights in this format
    renamings = hub_renamings(directory)
    if not renamings:
        return 0
    renamed = sum(_rename_file(directory / name, lambda key: apply_renamings(key, renamings)) for name in files)
    if index and renamed:
        index["weight_map"] = {apply_renamings(key, renamings): file for key, file in index["weight_map"].items()}
        _replace(index_path, lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
    if renamed:
        log.info("renamed %d saved weights of %s to the hub's layout (what vLLM loads)", renamed, directory)
    return renamed


def _rename_file(path: Path, rename: Any) -> int:
    """Rewrite one safetensors file with renamed keys (same tensors, same metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        names = {key: rename(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
        changed = sum(key != new for key, new in names.items())
        if not changed:
            return 0
        metadata = f.metadata()
        tensors = {new: f.get_tensor(key) for key, new in names.items()}
    _replace(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return changed


def _replace(path: Path, write: Any) -> None:
    """Write beside `path`, then rename over it: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
