"""One small workflow per training stage, all driven by `kubetune.trainer.runner`.

A stage module exposes `build_trainer(ctx) -> transformers.Trainer`; the runner owns everything
shared (output session, resume, model loading, callbacks, saving). Optional hooks (see
`runner._train`): `preflight(spec) -> spec`, `load_model(spec, precision, tokenizer)`,
`sample_prompts(eval_rows, count)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_MODULES = {
    "pt": "kubetune.trainer.stages.causal_lm",
    "sft": "kubetune.trainer.stages.causal_lm",
    "rm": "kubetune.trainer.stages.rm",
    "dpo": "kubetune.trainer.stages.dpo",
    "kto": "kubetune.trainer.stages.kto",
    "ppo": "kubetune.trainer.stages.ppo",
    "raft": "kubetune.trainer.stages.raft",
    "grpo": "kubetune.trainer.stages.grpo",
}


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(STAGE_MODULES[stage])
