"""What a trained output directory says about itself: is it a LoRA adapter, which base it needs,
the training spec saved beside it, and the `NAME=PATH` spelling of an adapter to serve.

Shared by training (a pipeline stage starting from a LoRA output), export, and the serving pod's
agents (model fetch, adapter sidecar); reads local files only, loads no model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.artifacts.output import RESOLVED_SPEC_FILE

log = logging.getLogger(__name__)


@dataclass
class AdapterRef:
    """A LoRA adapter to serve under `name`."""

    name: str
    location: str


def parse_adapter_arg(value: str) -> AdapterRef:
    """`NAME=PATH` (vLLM's `--lora-modules` spelling) or a bare PATH (named after its directory)."""
    head = value.split("=", 1)[0]
    if "=" in value and "/" not in head and ":" not in head:
        name, location = value.split("=", 1)
    else:
        location = value
        name = Path(location.rstrip("/")).name
    if not name or not location:
        raise SpecError("--adapter", f"{value!r} is not NAME=PATH.", "write it as NAME=PATH, e.g. --adapter support=outputs/support.")
    return AdapterRef(name=name, location=location)


def read_saved_spec(directory: Path):
    """The training spec saved beside a trained model or adapter, or None."""
    from kubetune.trainer.api.specfile import validate_training

    spec_file = directory / RESOLVED_SPEC_FILE
    if not spec_file.is_file():
        return None
    try:
        return validate_training(yaml.safe_load(spec_file.read_text()), str(spec_file))
    except Exception as exc:  # an older/foreign spec must not block inference
        log.warning("ignoring %s: %s", spec_file, str(exc).splitlines()[0] if str(exc) else exc)
        return None


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def adapter_base(adapter_dir: Path) -> tuple[str, Any]:
    """(base location, saved training spec or None) of a LoRA output directory."""
    spec = read_saved_spec(adapter_dir)
    if spec is not None:
        return spec.model.path, spec
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise SpecError("adapter", f"{str(adapter_dir)!r} has an unreadable adapter_config.json.", "pass a LoRA output directory.") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise SpecError("--base", f"the adapter in {str(adapter_dir)!r} does not name its base model.", "pass --base PATH.")
    return base, None
