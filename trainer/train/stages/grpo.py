"""`grpo`: group relative policy optimisation (Shao et al. 2024) with TRL's GRPOTrainer.

For each prompt, `generation.samplesPerPrompt` answers form a group; each answer's advantage is its
reward relative to the group's mean (and spread), so no value model is trained. Rewards come from
`reward.function` (verifiable rewards: exact match, regex, unit tests) or `reward.model`, through
the same scorer as `ppo`/`raft`. Prompts are the run's own (`PromptProcessor`): the chat-templated
prompt text, with `reference` (the dataset's answer) handed to the reward function.

Batch sizes follow TRL: `train.batchSize` counts answers, not prompts, so batchSize x
gradientAccumulation x processes must be a multiple of `samplesPerPrompt`.
"""

from __future__ import annotations

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.context import RunContext
from kubetune.trainer.train.distributed import world_info
from kubetune.trainer.train.rewards import load_scorer
from kubetune.trainer.train.stages.rollout import preflight as rollout_preflight
from kubetune.trainer.train.stages.rollout import sample_prompts

__all__ = ["build_trainer", "preflight", "sample_prompts"]


def preflight(spec: TrainingSpec) -> TrainingSpec:
    group = spec.generation.samplesPerPrompt
    answers = spec.train.batchSize * spec.train.gradientAccumulation * world_info()[2]
    if group < 2:
        raise SpecError("generation.samplesPerPrompt", "GRPO compares answers within a group, so it needs at least 2 per prompt.", "set it to 2 or more (4-16 is usual).")
    if answers % group:
        raise SpecError("train.batchSize", f"GRPO batches count answers: batchSize x gradientAccumulation x processes = {answers} is not a multiple of "
                        f"generation.samplesPerPrompt={group}.", f"make train.batchSize a multiple of {group}.")
    return rollout_preflight(spec)


def build_trainer(ctx: RunContext):
    from trl import GRPOConfig, GRPOTrainer

    from kubetune.trainer.train.stages._trl import trl_config

    spec = ctx.spec
    g, gen = spec.grpo, spec.generation
    args = trl_config(
        GRPOConfig, ctx.training_args,
        num_generations=gen.samplesPerPrompt, max_completion_length=gen.maxNewTokens, temperature=gen.temperature,
        top_p=gen.topP, top_k=gen.topK, beta=g.beta, loss_type=g.lossType, epsilon=g.epsilon, num_iterations=g.iterations,
        disable_dropout=True, log_completions=False,
    )
    scorer = load_scorer(spec, device=ctx.training_args.device, policy=ctx.model)
    return GRPOTrainer(
        model=ctx.model,
        reward_funcs=[scorer],
        args=args,
        train_dataset=ctx.data.train,
        eval_dataset=ctx.data.eval,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        optimizers=ctx.optimizers,
    )
