"""One small workflow per training stage, all driven by `kubetune.trainer.train.runner`.

A stage module exposes `build_trainer(ctx) -> transformers.Trainer`; the runner owns everything
shared (output session, resume, model loading, callbacks, saving). Optional hooks (see
`runner._train`): `preflight(spec) -> spec`, `load_model(spec, precision, tokenizer)`,
`sample_prompts(eval_rows, count)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
