"""The tokenized-dataset cache: token rows stored once under a content-addressed key, reused by
every rank of a training run and by later runs (`kubetune prepare` writes, `build_datasets` reads).

The key is a SHA-256 over everything that changes the token rows, and nothing else:
- the data format version of this module (`DATA_FORMAT_VERSION`, bumped when the pipeline's
  output changes for the same inputs);
- per source (training and eval): its spec entry minus the path (format, columns, split, subset,
  weight, maxSamples) plus the identity of its content: per local file its relative name, size
  and SHA-256; per S3 object its key, size and ETag (one LIST, nothing downloaded); for a hub
  dataset its id and current commit sha (a source that cannot be identified, e.g. an offline hub
  dataset, makes the spec uncacheable rather than risk stale rows);
- the stage, its processor and the processor's configuration (maxLength, maskPrompt, packing),
  the chat template text, evalSize, mixStrategy, shuffle and the seed;
- the tokenizer: its serialised model (vocabulary, merges, added tokens, normalizer, post
  processor; truncation/padding state excluded) and its special tokens.
Paths themselves are not in the key for local data, so the same files prepared elsewhere match.

Layout of one entry, `<root>/datasets/<key>/`:
    train/                 `datasets.save_to_disk` (Arrow) of the training rows
    eval/                  the same for the eval rows, when there are any
    kubetune-dataset.json  the completion marker: key inputs, files and sizes, data stats
The marker is written last (locally: the entry is built under a temporary name and renamed into
place; in S3: uploaded after every data file was uploaded and verified), and a reader checks that
every file it lists is there with its size. An entry without a marker, or with a file missing,
is never used: the run tokenizes itself instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import datasets

from kubetune.trainer.api.errors import KubetuneError
from kubetune.trainer.api.spec import DatasetSpec, StorageSpec, TrainingSpec
from kubetune.trainer.api.uri import S3Uri, is_s3
from kubetune.trainer.train.data.loader import is_local, list_files

log = logging.getLogger("kubetune.data.cache")

DATA_FORMAT_VERSION = 1
"""Bump when the pipeline produces different rows from the same inputs (new columns, a changed
masking rule, ...): old entries then simply stop matching."""
MARKER = "kubetune-dataset.json"
ENTRIES = "datasets"
SPLITS = ("train", "eval")


# ---------------------------------------------------------------------------------------------
# The key


def _sha256_file(path: Path, storage: StorageSpec) -> str:
    """SHA-256 of a local data file, memoised by (path, size, mtime) under the cache root: every
    rank of a run computes the key, and hashing a large corpus once per rank would be wasteful."""
    from kubetune.trainer.artifacts.cache import cache_root
    from kubetune.trainer.artifacts.hashing import file_hexdigest

    stat = path.stat()
    resolved = str(path.resolve())
    memo = cache_root(storage) / "digests" / f"{hashlib.sha256(resolved.encode()).hexdigest()}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(memo.read_text())
        if known["path"] == resolved and known["size"] == stat.st_size and known["mtime"] == stat.st_mtime_ns:
            return str(known["sha256"])
    sha256 = file_hexdigest(path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({"path": resolved, "size": stat.st_size, "mtime": stat.st_mtime_ns,
                                   "sha256": sha256}))
        os.replace(tmp, memo)
    return sha256


def source_identity(source: DatasetSpec, storage: StorageSpec, *, field: str) -> dict[str, Any] | None:
    """What identifies the content of one source, or None when it cannot be identified."""
    path = source.path
    if is_s3(path):
        from kubetune.trainer.artifacts.cache import resolve_objects
        from kubetune.trainer.artifacts.client import get_client, translate

        uri = S3Uri.parse(path, f"{field}.path")
        try:
            _single, objects = resolve_objects(get_client(storage), uri, path, f"{field}.path")
        except KubetuneError:
            raise
        except Exception as exc:
            raise translate(exc, path, field=f"{field}.path", action="list") from None
        return {"s3": path, "objects": [[o.key, o.size, o.etag] for o in objects]}
    if is_local(path):
        local = Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()
        if not local.exists():
            return None  # the pipeline reports it, naming the field
        files = list_files(local, field=field)
        root = local if local.is_dir() else local.parent
        return {"files": [[f.relative_to(root).as_posix(), f.stat().st_size, _sha256_file(f, storage)] for f in files]}
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(path).sha
    except Exception as exc:  # offline, unknown id, no access: not cacheable, never a failure
        log.warning("%s: cannot identify the revision of hub dataset %r (%s: %s); it is not cached",
                    field, path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    return {"hub": path, "sha": sha} if sha else None


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of everything about the tokenizer that changes token ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Set by tokenizer calls with padding/truncation arguments: not part of its identity.
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:  # a slow tokenizer: its vocabulary (added tokens included)
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {
        "special": tokenizer.special_tokens_map,
        "addBos": getattr(tokenizer, "add_bos_token", None),
        "addEos": getattr(tokenizer, "add_eos_token", None),
        "size": len(tokenizer),
    }
    digest.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def key_inputs(spec: TrainingSpec, tokenizer: Any) -> dict[str, Any] | None:
    """Everything the key is a hash of (recorded in the marker, to explain a miss); None when
    a source cannot be identified. The tokenizer must be set up as for training (template
    applied, vocabulary extended)."""
    from dataclasses import asdict

    from kubetune.trainer.train.data.processors import PROCESSORS, processor_config

    data = spec.data
    sources = []
    for prefix, group in (("data.datasets", data.datasets), ("data.evalDatasets", data.evalDatasets)):
        for index, source in enumerate(group):
            identity = source_identity(source, spec.storage, field=f"{prefix}[{index}]")
            if identity is None:
                return None
            entry = source.model_dump(mode="json", exclude={"path"})
            sources.append({"field": f"{prefix}[{index}]", **entry, "content": identity})
    processor = PROCESSORS.get(spec.stage)
    if processor is None:
        return None  # a stage without a processor tokenizes nothing here
    template = json.dumps(tokenizer.chat_template, sort_keys=True, default=str)
    return {
        "formatVersion": DATA_FORMAT_VERSION,
        "stage": spec.stage,
        "processor": f"{processor.__module__}.{getattr(processor, '__qualname__', type(processor).__name__)}",
        "processorConfig": asdict(processor_config(spec)),
        "sources": sources,
        "evalSize": data.evalSize,
        "mixStrategy": data.mixStrategy,
        "shuffle": data.shuffle,
        "seed": spec.train.seed,
        "template": hashlib.sha256(template.encode()).hexdigest(),
        "tokenizer": tokenizer_identity(tokenizer),
    }


def key_of(inputs: dict[str, Any]) -> str:
    """The entry key of `key_inputs`' result."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_key(spec: TrainingSpec, tokenizer: Any) -> str | None:
    """The entry key for this spec and tokenizer (None: not cacheable)."""
    inputs = key_inputs(spec, tokenizer)
    return None if inputs is None else key_of(inputs)


# ---------------------------------------------------------------------------------------------
# Entries


def _entry_files(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _complete(directory: Path, marker: dict[str, Any]) -> bool:
    """Every file the marker lists is present with its size."""
    for name, size in (marker.get("files") or {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            log.warning("tokenized-dataset cache entry %s is incomplete (%s missing or truncated); ignoring it",
                        directory, name)
            return False
    return bool(marker.get("files"))


class TokenizedCache:
    """One cache root: a local directory or an `s3://` prefix."""

    def __init__(self, location: str, storage: StorageSpec | None = None):
        self.location = location
        self.storage = storage or StorageSpec()
        self.s3 = is_s3(location)
        if self.s3:
            self.root = S3Uri.parse(location, "data.cache")

    def entry(self, key: str) -> str:
        if self.s3:
            return str(self.root.join(ENTRIES, key)) + "/"
        return str(Path(self.location).expanduser() / ENTRIES / key)

    # -- reading ---------------------------------------------------------------------------
    def lookup(self, key: str) -> dict[str, Any] | None:
        """The completion marker of the entry, or None when there is no complete entry. Reads only
        the marker (and, locally, the file sizes): nothing is downloaded."""
        if not self.s3:
            directory = Path(self.entry(key))
            marker = _read_marker(directory / MARKER)
            return marker if marker is not None and _complete(directory, marker) else None
        from kubetune.trainer.artifacts.client import get_client, is_not_found, translate

        uri = self.root.join(ENTRIES, key, MARKER)
        try:
            body = get_client(self.storage).get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise translate(exc, str(uri), field="data.cache", action="read") from None
        try:
            marker = json.loads(body)
        except ValueError:
            log.warning("tokenized-dataset cache marker %s is not JSON; ignoring the entry", uri)
            return None
        return marker if isinstance(marker, dict) and marker.get("key") == key else None

    def load(self, key: str) -> tuple[dict[str, datasets.Dataset | None], dict[str, Any]] | None:
        """({split: rows}, stats) of a complete entry, or None. An S3 entry is downloaded into the
        local input cache first (once per node: concurrent ranks share it under a lock)."""
        marker = self.lookup(key)
        if marker is None:
            return None
        if self.s3:
            from kubetune.trainer.artifacts import localize

            directory = localize(self.entry(key), self.storage, field="data.cache")
        else:
            directory = Path(self.entry(key))
        if not _complete(directory, marker):
            return None
        if not self.s3:
            from kubetune.trainer.artifacts.cache import mark_used

            mark_used(directory)  # for `kubetune storage gc` (S3 entries are stamped by localize)
        splits: dict[str, datasets.Dataset | None] = {}
        for split in SPLITS:
            present = (marker.get("splits") or {}).get(split)
            splits[split] = datasets.load_from_disk(str(directory / split)) if present else None
        return splits, marker.get("stats") or {}

    # -- writing ---------------------------------------------------------------------------
    def store(self, key: str, bundle: Any, inputs: dict[str, Any] | None = None) -> str:
        """Write `bundle` (a DataBundle) as the entry `key`; the marker goes last. Returns the
        entry's location. Existing complete entries are left alone."""
        if self.lookup(key) is not None:
            return self.entry(key)
        staging_parent = Path(self.entry(key)).parent if not self.s3 else _staging_root(self.storage)
        staging_parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=staging_parent))
        try:
            splits = {"train": bundle.train, "eval": bundle.eval}
            for split, rows in splits.items():
                if rows is not None:
                    rows.save_to_disk(str(staging / split))
            marker = {
                "key": key,
                "formatVersion": DATA_FORMAT_VERSION,
                "createdAt": time.time(),
                "splits": {split: rows is not None for split, rows in splits.items()},
                "files": _entry_files(staging),
                "stats": bundle.stats,
                "inputs": inputs,
            }
            text = json.dumps(marker, indent=1, default=str)
            if self.s3:
                self._upload(key, staging, text)
            else:
                self._install_local(key, staging, text)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("tokenized datasets stored at %s", self.entry(key))
        return self.entry(key)

    def _install_local(self, key: str, staging: Path, marker_text: str) -> None:
        (staging / MARKER).write_text(marker_text)
        final = Path(self.entry(key))
        if self.lookup(key) is not None:  # a concurrent `prepare` finished first: keep its entry
            return
        if final.exists():  # an incomplete leftover
            stale = final.with_name(f".{key}.stale-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(OSError):
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if self.lookup(key) is None:  # not a concurrent writer that won the race
                raise

    def _upload(self, key: str, staging: Path, marker_text: str) -> None:
        from kubetune.trainer.artifacts.transfer import Transfers, upload_directory

        entry = self.entry(key)
        upload_directory(staging, entry, self.storage)  # every file verified before the marker
        marker_file = staging.parent / f"{staging.name}.{MARKER}"
        marker_file.write_text(marker_text)
        try:
            with Transfers(self.storage) as transfers:
                transfers.upload_file(marker_file, S3Uri.parse(entry, "data.cache").join(MARKER))
        finally:
            marker_file.unlink(missing_ok=True)


def _staging_root(storage: StorageSpec) -> Path:
    from kubetune.trainer.artifacts.cache import cache_root

    return cache_root(storage) / "prepare-staging"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def load_cached(spec: TrainingSpec, tokenizer: Any) -> tuple[dict[str, datasets.Dataset | None], dict[str, Any]] | None:
    """For `build_datasets`: the cached rows and stats of this spec, or None (no cache configured,
    streaming, not cacheable, or no complete entry yet: the caller tokenizes)."""
    from kubetune.trainer.artifacts.datacache import cache_location

    location = cache_location(spec)
    if location is None or spec.data.streaming:
        return None
    key = cache_key(spec, tokenizer)
    if key is None:
        return None
    cache = TokenizedCache(location, spec.storage)
    found = cache.load(key)
    if found is None:
        log.warning("tokenized datasets: no complete cache entry at %s; tokenizing in this process "
                    "(run `kubetune prepare` first to tokenize once for every rank and later runs)", cache.entry(key))
        return None
    log.info("tokenized datasets: cache hit at %s (nothing is tokenized in this run)", cache.entry(key))
    return found
