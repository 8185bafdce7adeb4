"""`kubetune prepare SPEC`: tokenize a spec's datasets once, into the tokenized-dataset cache.

Why a separate step: every rank of a distributed run builds the same token rows, and for a large
corpus that takes longer than the collective timeout, so ranks die waiting at the first barrier
(and GPUs idle while CPUs tokenize). `prepare` runs the data pipeline once, stores the result
under `data.cache` (see `kubetune.trainer.train.data.cache` for the key and the layout), and every rank
of the training run then only reads it. On the cluster the operator runs it in a one-pod, CPU-only
Job before the training gang (`kubetune.operator.render.training.render_prepare_job`).

Idempotent: when a complete entry for the key exists, nothing is tokenized or uploaded.

This module is light at import (the operator imports `cache_location` and `prepare_skip_reason`
to decide whether a job gets a prepare pod); the data pipeline, transformers and boto3 are
imported only when something is prepared.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubetune.trainer.api.errors import SpecError, SpecErrors
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.artifacts.uri import S3Uri, is_s3

log = logging.getLogger("kubetune.prepare")

CACHE_AUTO = "auto"
CACHE_OFF = "off"
CACHE_PREFIX = "kubetune-cache/"
"""Key prefix of `data.cache: auto` in the output's bucket."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
"""Files a tokenizer never needs: an S3 model's weights are not downloaded to prepare its data."""


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


@dataclass
class PrepareResult:
    """What `prepare` did, for the CLI's one-line report."""

    location: str | None
    """The cache entry (None when nothing could be cached)."""
    hit: bool
    """True when a complete entry already existed (nothing was tokenized)."""
    key: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def prepare(spec: TrainingSpec) -> PrepareResult:
    """Tokenize `spec`'s datasets into its `data.cache`, unless a complete entry exists.

    The tokenizer is set up exactly as the training run sets it up (chat template, vocabulary
    extension), so the key computed here is the key the training run looks for.
    """
    from kubetune.trainer.train.data.cache import TokenizedCache, key_inputs, key_of
    from kubetune.trainer.train.data.pipeline import build_uncached
    from kubetune.trainer.train.data.templates import apply_template
    from kubetune.trainer.train.models.loader import load_tokenizer
    from kubetune.trainer.train.models.vocab import extend_tokenizer

    location = cache_location(spec)
    if location is None:
        raise SpecError("data.cache", "is not set, so there is nowhere to store the tokenized datasets.",
                        "set data.cache to an s3:// prefix, a directory, or auto.")
    if spec.data.streaming:
        return PrepareResult(None, False, note="data.streaming is on: streamed datasets are tokenized on the fly, "
                             "nothing to prepare")
    tokenizer = load_tokenizer(_tokenizer_only(spec), spec.storage)
    apply_template(tokenizer, spec.data.template)
    if spec.vocab.enabled:
        extend_tokenizer(spec, tokenizer)
    inputs = key_inputs(spec, tokenizer)
    if inputs is None:
        return PrepareResult(None, False, note="the data's content cannot be identified (see the warning above); "
                             "the training run tokenizes it itself")
    key = key_of(inputs)
    cache = TokenizedCache(location, spec.storage)
    marker = cache.lookup(key)
    if marker is not None:
        log.info("tokenized datasets already cached at %s: nothing to do", cache.entry(key))
        return PrepareResult(cache.entry(key), True, key, marker.get("stats") or {})
    bundle = build_uncached(spec, tokenizer)
    entry = cache.store(key, bundle, inputs)
    return PrepareResult(entry, False, key, bundle.stats)


def _tokenizer_only(spec: TrainingSpec) -> Any:
    """`spec.model`, with an `s3://` tokenizer location replaced by a local copy of its small files
    (tokenizer, configs): the prepare pod needs the tokenizer, not gigabytes of weights. Other
    locations are left alone (hub downloads fetch only tokenizer files; local ones are here)."""
    location = spec.model.tokenizer or spec.model.path
    if not is_s3(location):
        return spec.model
    from kubetune.trainer.api.errors import KubetuneError
    from kubetune.trainer.artifacts.cache import cache_root, resolve_objects
    from kubetune.trainer.artifacts.client import get_client, translate
    from kubetune.trainer.artifacts.transfer import Transfers
    from kubetune.trainer.artifacts.uri import safe_join

    field = "model.tokenizer" if spec.model.tokenizer else "model.path"
    uri = S3Uri.parse(location, field)
    target = safe_join(cache_root(spec.storage) / "tokenizers" / uri.bucket, uri.key.strip("/"), location=location, field=field)
    client = get_client(spec.storage)
    try:
        single, objects = resolve_objects(client, uri, location, field)
        wanted = [o for o in objects if not o.key.endswith("/") and not o.key.lower().endswith(WEIGHT_SUFFIXES)]
        items = []
        for info in wanted:
            relative = PurePosixPath(info.key).name if single else uri.relative(info.key)
            local = safe_join(target, relative, location=location, field=field)  # always fetched: never a stale tokenizer
            local.parent.mkdir(parents=True, exist_ok=True)
            items.append((info, local, None))
        with Transfers(spec.storage, client) as transfers:
            transfers.download_verified(items, uri.bucket, f"tokenizer {uri.name}")
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, location, field=field, action="download") from None
    log.info("tokenizer files of %s: %d file(s), weights skipped", location, len(wanted))
    return spec.model.model_copy(update={"tokenizer": str(target)})


def register(subparsers: Any) -> None:
    """The `prepare` subcommand (entry point `kubetune.cli`: prepare)."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a spec's datasets once into data.cache (what a FineTuneJob's prepare pod runs)",
        description="Run the data pipeline of a training spec or FineTuneJob/AlignmentJob manifest and store the "
        "token rows in data.cache, keyed by the data's content, tokenizer, template and length settings. A "
        "training run with the same key reads them instead of tokenizing. A second run finds the entry and "
        "does nothing.",
    )
    p.add_argument("file", help="a training spec YAML, or a FineTuneJob/AlignmentJob manifest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set data.maxLength=2048 (repeatable)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.specfile import load_spec
    from kubetune.trainer.train.preflight import preflight

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_spec(args.file, args.overrides)
    preflight(loaded.spec, loaded.field_prefix, loaded.source)
    try:
        result = prepare(loaded.spec)
    except SpecError as err:
        raise SpecErrors([err.prefixed(loaded.field_prefix)], loaded.source) from None
    if result.location is None:
        print(f"Nothing cached: {result.note}.", file=sys.stderr)
    elif result.hit:
        print(f"Already prepared: {result.location}")
    else:
        train = result.stats.get("train") or {}
        rows = train.get("packedRows", train.get("examples"))
        print(f"Prepared {rows} training rows: {result.location}")
    return 0
