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

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.specfile import apply_overrides, extract_training, validate_training
from kubetune.trainer.artifacts.documents import read_yaml


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from (for messages and the resolved-spec file)."""

    spec: TrainingSpec
    source: str
    kind: str | None = None
    """The custom resource kind when the file was a manifest, else None."""
    field_prefix: str = ""
    """Where the training spec sits in the file (`spec.training` for manifests)."""


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> LoadedSpec:
    """Read, extract, override and validate a spec file."""
    source = str(path)
    document = read_yaml(path)
    training, kind, prefix = extract_training(document, source)
    training = apply_overrides(training, overrides)
    return LoadedSpec(validate_training(training, source, prefix), source, kind, prefix)
