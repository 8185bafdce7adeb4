"""Reading a spec file for a command: a bare training spec or a kubetune custom resource.

`kubetune train job.yaml` accepts exactly what `kubectl apply -f job.yaml` accepts. For a
`FineTuneJob`/`AlignmentJob` manifest the training spec is `spec.training`; the cluster fields
beside it (nodes, GPUs, image, ...) are the operator's business and are ignored locally. The
parsing and validation are `kubetune.trainer.api.specfile`'s; this adds the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.specfile import apply_overrides, extract_training, validate_training


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from (for messages and the resolved-spec file)."""

    spec: TrainingSpec
    source: str
    kind: str | None = None
    """The custom resource kind when the file was a manifest, else None."""
    field_prefix: str = ""
    """Where the training spec sits in the file (`spec.training` for manifests)."""


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "file not found.", "pass the path of a spec or manifest YAML file.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(str(path), f"is not valid YAML{where}: {problem}.", "fix the YAML syntax.") from None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> LoadedSpec:
    """Read, extract, override and validate a spec file."""
    source = str(path)
    document = read_yaml(path)
    training, kind, prefix = extract_training(document, source)
    training = apply_overrides(training, overrides)
    return LoadedSpec(validate_training(training, source, prefix), source, kind, prefix)
