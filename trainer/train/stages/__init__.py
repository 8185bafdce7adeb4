"""One small workflow per training stage, all driven by `kubetune.trainer.train.runner`.

A stage module exposes `build_trainer(ctx) -> transformers.Trainer`; the runner owns everything
shared (output session, resume, model loading, callbacks, saving). Optional hooks (see
`runner._train`): `preflight(spec) -> spec`, `load_model(spec, precision, tokenizer)`,
`sample_prompts(eval_rows, count)`. `stage_for(spec)` picks the vision-language workflows for a
model with a vision encoder: `stages.vision_dpo` for `dpo`, `stages.vision` (which refuses the
stages it does not train) for the others.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.trainer.api.spec import TrainingSpec

STAGE_MODULES = {
    "pt": "kubetune.trainer.train.stages.causal_lm",
    "sft": "kubetune.trainer.train.stages.causal_lm",
    "rm": "kubetune.trainer.train.stages.rm",
    "dpo": "kubetune.trainer.train.stages.dpo",
    "kto": "kubetune.trainer.train.stages.kto",
    "ppo": "kubetune.trainer.train.stages.ppo",
    "raft": "kubetune.trainer.train.stages.raft",
    "grpo": "kubetune.trainer.train.stages.grpo",
}


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[stage])


def stage_for(spec: TrainingSpec) -> ModuleType:
    """The workflow of this run: the stage's, or a vision-language one when the model has a
    vision encoder (`vision`'s `preflight` refuses the stages neither trains)."""
    from kubetune.trainer.train.models.vision import is_vision_model

    if is_vision_model(spec):
        workflow = "vision_dpo" if spec.stage == "dpo" else "vision"
        return importlib.import_module(f"kubetune.trainer.train.stages.{workflow}")
    return stage_module(spec.stage)
