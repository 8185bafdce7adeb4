"""The storage interface and its local implementation; `s3output.S3OutputSession` extends it.

Completion rule, the same locally and in S3: a checkpoint is complete when its manifest
(`kubetune-manifest.json`: step, and per file its size and SHA-256) exists and every listed file
is present with that size. The manifest is always written last.

In a multi-node run each node writes part of a checkpoint to its own disk (ZeRO optimizer-state
shards, per-rank RNG states). The global rank 0 finishes a checkpoint (`checkpoint_saved`,
naming the other nodes that hold files of it); one process of every other such node hands over
its own files (`checkpoint_shards_saved`). Only the S3 session can combine them (see
`s3output.py`); locally, with no shared store, each disk keeps what its ranks wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.trainer.errors import SpecError
from kubetune.trainer.spec import StorageSpec
from kubetune.trainer.storage.hashing import file_hexdigest
from kubetune.trainer.storage.uri import is_s3

MANIFEST_NAME = "kubetune-manifest.json"
"""Written last into a checkpoint: its presence (and matching sizes) marks the checkpoint complete."""
STATUS_NAME = "status.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def localize(location: str, settings: StorageSpec | None = None, *, field: str) -> Path:
    """Return a local path for an input location (a model directory, a dataset file or directory).

    `s3://` locations are downloaded once into the cache (see `cache.py`); a second call with
    unchanged objects downloads nothing. Local paths must exist.
    """
    if is_s3(location):
        from kubetune.trainer.storage.cache import localize_s3

        return localize_s3(location, settings, field=field)
    path = Path(location).expanduser()
    if not path.exists():
        raise SpecError(
            field,
            f"{location!r} does not exist.",
            "check the path (relative paths are resolved from the current directory).",
        )
    return path


def write_manifest(checkpoint: Path, step: int) -> dict[str, Any]:
    """Record every file of a checkpoint (size, sha256) and write the manifest last, atomically."""
    files = {}
    for file in checkpoint_files(checkpoint):
        files[file.relative_to(checkpoint).as_posix()] = {"size": file.stat().st_size, "sha256": file_hexdigest(file)}
    manifest = {"step": step, "files": files, "createdAt": time.time()}
    save_manifest(checkpoint, manifest)
    return manifest


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The files a manifest covers: everything but the manifest itself and temp files."""
    return sorted(
        p for p in checkpoint.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp")
    )


def save_manifest(checkpoint: Path, manifest: dict[str, Any]) -> None:
    """Write a manifest atomically (temp file + rename), so a reader never sees half of it."""
    tmp = checkpoint / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, checkpoint / MANIFEST_NAME)


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The manifest if the checkpoint is complete (all files present with their sizes), else None."""
    try:
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    for name, meta in manifest.get("files", {}).items():
        file = checkpoint / name
        if not file.is_file() or file.stat().st_size != meta["size"]:
            return None
    return manifest


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


class OutputSession:
    """Owns a run's output directory: checkpoints, resume, status, final artifacts.

    `local_dir` is where the trainer writes (its `output_dir`). `keep_last` is accepted for the
    S3 session's retention (and its rotation of other nodes' disks, where transformers does not
    rotate); locally, transformers' `save_total_limit` already rotates checkpoints.
    """

    def __init__(
        self,
        location: str,
        settings: StorageSpec | None = None,
        *,
        keep_last: int | None = None,
        local_dir: Path | None = None,
    ):
        self.location = location
        self.settings = settings or StorageSpec()
        self.keep_last = keep_last
        self.local_dir = local_dir if local_dir is not None else Path(location).expanduser()
        self.local_dir.mkdir(parents=True, exist_ok=True)

    @property
    def last_checkpoint_uri(self) -> str | None:
        """Where the newest complete checkpoint is stored (for status.json)."""
        latest = OutputSession.latest_checkpoint(self)
        return str(latest) if latest else None

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; incomplete ones (no valid manifest) are skipped."""
        for _step, path in reversed(list_checkpoints(self.local_dir)):
            if read_manifest(path) is not None:
                return path
        return None

    def checkpoint_saved(self, path: Path, step: int, *, shards_from: Sequence[int] = (), token: str | None = None) -> None:
        """Called on the global rank 0 right after every rank finished writing a checkpoint.

        `shards_from`: the ranks that hand over files of this checkpoint from other disks (via
        `checkpoint_shards_saved`, same `token`); the checkpoint is complete only with them. A
        local output has no shared store to gather them in, so here the manifest covers this
        disk's files (a shared disk already holds every rank's files)."""
        write_manifest(path, step)

    def checkpoint_shards_saved(self, path: Path, step: int, files: Sequence[str], *, rank: int, token: str) -> None:
        """Called on one process of every other node holding files of a checkpoint (`files`,
        relative to `path`): hand them over to the checkpoint finished by rank 0. Nothing to do
        for a local output (see `checkpoint_saved`)."""

    def wait_shards(self) -> None:
        """Block until the files handed over by `checkpoint_shards_saved` are stored; raise if
        that failed (no-op locally)."""

    def remove_incomplete_checkpoints(self) -> list[Path | str]:
        """Delete checkpoints that never got a manifest (a run killed mid-save); keep the rest."""
        removed: list[Path | str] = []
        for _step, path in list_checkpoints(self.local_dir):
            if read_manifest(path) is None:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def write_status(self, status: dict[str, Any], *, force: bool = False) -> None:
        """Write `status.json` atomically (`force` matters for S3: upload now, not throttled)."""
        self._write_local_status(status)

    def _write_local_status(self, status: dict[str, Any]) -> str:
        text = json.dumps(status, indent=1, default=str)
        tmp = self.local_dir / (STATUS_NAME + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.local_dir / STATUS_NAME)
        return text

    def finalize(self) -> None:
        """Block until every output is durably stored and verified (no-op locally)."""

    def close(self) -> None:
        """Release background resources without raising (the failure path); no-op locally."""

    def __enter__(self) -> OutputSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_status(output: str, settings: StorageSpec | None = None, **timeouts: float) -> dict[str, Any] | None:
    """The `status.json` a run wrote under `output` (local path or `s3://` prefix), or None when
    it does not exist (yet) or cannot be read: never raises. `timeouts` (`connect_timeout`,
    `read_timeout`) go to the S3 client, for readers that must give up quickly."""
    from kubetune.trainer.storage.stream import open_stream

    try:
        with open_stream(f"{output.rstrip('/')}/{STATUS_NAME}", settings, field="output.path", **timeouts) as handle:
            data = json.loads(handle.read().decode())
    except Exception:  # absent, unreachable, half-written: the caller reads again later
        return None
    return data if isinstance(data, dict) else None


def open_output(location: str, settings: StorageSpec | None = None, *, keep_last: int | None = None) -> OutputSession:
    """The output session for a local directory or an `s3://` prefix."""
    if is_s3(location):
        from kubetune.trainer.storage.s3output import S3OutputSession

        return S3OutputSession(location, settings, keep_last=keep_last)
    return OutputSession(location, settings, keep_last=keep_last)
