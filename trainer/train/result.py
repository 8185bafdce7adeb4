"""What a training run returns: its own module so the runner and the pipeline workflow (which the
runner calls lazily) both build one without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    output_dir: Path
    global_step: int
    interrupted: bool = False
    resumed_from: str | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    runtime_seconds: float = 0.0
