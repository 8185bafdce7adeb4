"""Checks a spec can run here, without loading a model: run by `validate` and before training.

Schema validation (types, enums, ranges) is pydantic's job; this catches what depends on the
machine: files that are not there, names that resolve to nothing.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.trainer.api.errors import SpecError, SpecErrors
from kubetune.trainer.api.spec import ROLLOUT_STAGES, DatasetSpec, TrainingSpec
from kubetune.trainer.api.specfile import REFERENCE_SCHEME
from kubetune.trainer.api.uri import looks_like_local_path
from kubetune.trainer.train.models.builtin import BUILTINS, PREFIX, is_builtin


def _check_location(location: str, field: str, what: str) -> SpecError | None:
    if location.startswith(("s3://", REFERENCE_SCHEME)):
        return None
    if is_builtin(location):
        name = location[len(PREFIX):]
        if name not in BUILTINS:
            return SpecError(field, f"unknown builtin model {name!r}.", f"use one of: {', '.join(PREFIX + n for n in BUILTINS)}.")
        return None
    if looks_like_local_path(location) and not Path(location).expanduser().exists():
        return SpecError(field, f"{what} {location!r} does not exist.",
                         "check the path (relative paths are resolved from the current directory), or use an s3:// URI.")
    return None


def _dataset_errors(datasets: list[DatasetSpec], prefix: str) -> list[SpecError]:
    errors = []
    for i, ds in enumerate(datasets):
        err = _check_location(ds.path, f"{prefix}[{i}].path", "dataset")
        if err:
            errors.append(err)
    return errors


def _reward_errors(spec: TrainingSpec, prefix: str = "", produced: frozenset[str] = frozenset()) -> list[SpecError]:
    """A reward function must import; a reward or reference model must exist (unless an earlier
    pipeline step produces it)."""
    errors: list[SpecError] = []
    if spec.stage in ROLLOUT_STAGES and spec.reward.function:
        from kubetune.trainer.train.rewards import import_function

        try:
            import_function(spec.reward.function, f"{prefix}reward.function")
        except SpecError as err:
            errors.append(err)
    for location, field, what in ((spec.reward.model if spec.stage in ROLLOUT_STAGES else None, "reward.model", "reward model"),
                                  (spec.dpo.referenceModel if spec.stage == "dpo" else None, "dpo.referenceModel", "reference model")):
        if location and location not in produced:
            err = _check_location(location, f"{prefix}{field}", what)
            if err:
                errors.append(err)
    return errors


def _pipeline_errors(spec: TrainingSpec) -> list[SpecError]:
    errors: list[SpecError] = []
    produced: set[str] = set()
    for index, step in enumerate(spec.pipeline_specs()):
        prefix = f"pipeline[{index}]."
        if spec.pipeline[index].data is not None:
            errors += _dataset_errors(step.data.datasets, f"{prefix}data.datasets")
            errors += _dataset_errors(step.data.evalDatasets, f"{prefix}data.evalDatasets")
        errors += _reward_errors(step, prefix, frozenset(produced))
        produced.add(step.output_path)
    return errors


def preflight(spec: TrainingSpec, field_prefix: str = "", source: str | None = None) -> None:
    """Raise SpecErrors listing every problem found (all at once, so one edit fixes them)."""
    errors: list[SpecError] = []
    for err in (
        _check_location(spec.model.path, "model.path", "model"),
        _check_location(spec.model.tokenizer, "model.tokenizer", "tokenizer") if spec.model.tokenizer else None,
    ):
        if err:
            errors.append(err)
    errors += _dataset_errors(spec.data.datasets, "data.datasets")
    errors += _dataset_errors(spec.data.evalDatasets, "data.evalDatasets")
    errors += _pipeline_errors(spec) if spec.pipeline else _reward_errors(spec)
    if spec.data.template is not None and "{" not in spec.data.template:
        from kubetune.trainer.train.data.templates import TEMPLATES

        if spec.data.template not in TEMPLATES:
            errors.append(SpecError("data.template", f"unknown template {spec.data.template!r}.",
                                    f"use one of {', '.join(sorted(TEMPLATES))}, or a Jinja chat template string."))
    if errors:
        raise SpecErrors([err.prefixed(field_prefix) for err in errors], source)
