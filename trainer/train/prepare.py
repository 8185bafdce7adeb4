"""`kubetune prepare SPEC`: tokenize a spec's datasets once, into the tokenized-dataset cache.

Why a separate step: every rank of a distributed run builds the same token rows, and for a large
corpus that takes longer than the collective timeout, so ranks die waiting at the first barrier
(and GPUs idle while CPUs tokenize). `prepare` runs the data pipeline once, stores the result
under `data.cache` (see `kubetune.trainer.train.data.cache` for the key and the layout), and every rank
of the training run then only reads it. On the cluster the operator runs it in a one-pod, CPU-only
Job before the training gang (`kubetune.operator.training.render.render_prepare_job`).

Idempotent: when a complete entry for the key exists, nothing is tokenized or uploaded.

Where the cache lives and whether a cluster job gets a prepare pod are decided from the spec alone
in `kubetune.trainer.artifacts.datacache` (the operator imports that, not this module); the data
pipeline, transformers and boto3 are imported here only when something is prepared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.uri import S3Uri, is_s3
from kubetune.trainer.artifacts.datacache import cache_location

log = logging.getLogger("kubetune.prepare")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
"""Files a tokenizer never needs: an S3 model's weights are not downloaded to prepare its data."""


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
    from kubetune.trainer.api.uri import safe_join
    from kubetune.trainer.artifacts.cache import cache_root, resolve_objects
    from kubetune.trainer.artifacts.client import get_client, translate
    from kubetune.trainer.artifacts.transfer import Transfers

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
