"""Where the tokenized-dataset cache (`data.cache`) lives for a spec, and whether a cluster job
tokenizes once in a prepare pod: decided from the spec alone, by the trainer and the operator
alike (the cache's contents are `kubetune.trainer.train.data.cache`'s business).
"""

from __future__ import annotations

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.uri import S3Uri, is_s3

CACHE_AUTO = "auto"
CACHE_OFF = "off"
CACHE_PREFIX = "kubetune-cache/"
"""Key prefix of `data.cache: auto` in the output's bucket."""

def cache_location(spec: TrainingSpec) -> str | None:
    """The cache root `data.cache` names (None: no cache). `auto` sits beside the output: a
    `kubetune-cache/` prefix in the output's bucket, or `<storage cache dir>/datasets` locally."""
    value = spec.data.cache
    if value is None or value == CACHE_OFF:
        return None
    if value == CACHE_AUTO:
        output = spec.output_path
        if is_s3(output):
            return f"s3://{S3Uri.parse(output, 'output.path').bucket}/{CACHE_PREFIX}"
        from kubetune.trainer.artifacts.cache import cache_root

        return str(cache_root(spec.storage) / "datasets")
    if is_s3(value):
        S3Uri.parse(value, "data.cache")  # a malformed URI is a spec error naming the field
    return value


def cluster_default_cache(spec: TrainingSpec, nodes: int) -> TrainingSpec:
    """The training spec a cluster job runs: with several nodes writing to S3 and no `data.cache`
    (nor streaming, nor a pipeline, whose steps tokenize different data), the cache defaults to
    `auto`, so the datasets are tokenized once by the prepare pod instead of once per node while
    the other ranks wait at the first collective. `data.cache: off` keeps per-rank tokenization."""
    if spec.data.cache is not None or nodes < 2 or spec.data.streaming or spec.pipeline or not is_s3(spec.output_path):
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"cache": CACHE_AUTO})})


def prepare_skip_reason(spec: TrainingSpec) -> str | None:
    """Why a cluster job runs no prepare pod (None: it runs one). Only an `s3://` cache is shared
    by the prepare pod and the training pods (each pod's disk is its own emptyDir)."""
    location = cache_location(spec)
    if location is None:
        return "data.cache is not set"
    if spec.data.streaming:
        return "streamed datasets are tokenized on the fly, not cached"
    if not is_s3(location):
        return "data.cache is a local directory, which the training pods do not share"
    return None
