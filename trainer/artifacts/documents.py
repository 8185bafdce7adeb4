"""Reading a YAML document from a local file (a spec, a manifest), with a one-paragraph error for a
missing file or broken YAML. Shared by the trainer's commands and the operator's (`kubetune render`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.trainer.api.errors import SpecError


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
