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
import logging
import os
import re
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import is_s3
from kubetune.trainer.artifacts.hashing import file_hexdigest

MANIFEST_NAME = "kubetune-manifest.json"
"""Written last into a checkpoint: its presence (and matching sizes) marks the checkpoint complete."""
STATUS_NAME = "status.json"
RESOLVED_SPEC_FILE = "kubetune-spec.yaml"
"""The training spec with every default filled in, saved beside every trained output."""
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_LOGS = ("metrics.jsonl", "samples.jsonl")
"""Append-only files of a run (callbacks.METRICS_FILE, samples.SAMPLES_FILE), which every attempt
of a job continues."""
LOGS_DIR = "kubetune-logs"
"""Inside a checkpoint: the run logs as they were when it was saved (see `snapshot_run_logs`)."""

log = logging.getLogger("kubetune.storage")


def localize(location: str, settings: StorageSpec | None = None, *, field: str) -> Path:
    """Return a local path for an input location (a model directory, a dataset file or directory).

    `s3://` locations are downloaded once into the cache (see `cache.py`); a second call with
    unchanged objects downloads nothing. Local paths must exist.
    """
    if is_s3(location):
        from kubetune.trainer.artifacts.cache import localize_s3

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


def checkpoint_step(checkpoint: Path) -> int | None:
    """The global step a checkpoint was saved at (its trainer_state.json), else from its name."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_RE.match(checkpoint.name)
        return int(match.group(1)) if match else None


def snapshot_run_logs(local_dir: Path, checkpoint: Path) -> None:
    """Copy the run logs into the checkpoint (`LOGS_DIR`), before its manifest is written.

    The copy is exactly what a resume from this checkpoint continues: the records written up to
    this save, whatever happened after it (steps logged and then lost to a kill, a final
    evaluation that never finished, a log upload that never landed in S3). Being part of the
    checkpoint, it is covered by the manifest, uploaded and downloaded with it, rotated with it."""
    target = checkpoint / LOGS_DIR
    for name in RUN_LOGS:
        source = local_dir / name
        if source.is_file():
            target.mkdir(exist_ok=True)
            tmp = target / (name + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target / name)


def rewind_run_logs(local_dir: Path, checkpoint: Path | None) -> None:
    """Make the run logs hold what a run resuming from `checkpoint` continues, each record once.

    A killed attempt may have logged steps past its last complete checkpoint, which the resumed
    run trains and logs again. A checkpoint of this output carries its own copy of the logs
    (`snapshot_run_logs`), which replaces the local ones. Without a copy (a checkpoint from
    elsewhere, or from an older kubetune), records of later steps are dropped. Starting afresh
    (`checkpoint` None) drops every stepped record of earlier attempts (their `start` records
    stay, as the job's history)."""
    step = checkpoint_step(checkpoint) if checkpoint is not None else None
    limit = step if step is not None else -1
    own = checkpoint is not None and checkpoint.resolve().parent == local_dir.resolve()
    for name in RUN_LOGS:
        local = local_dir / name
        copy = checkpoint / LOGS_DIR / name if own and checkpoint is not None else None
        if copy is not None and copy.is_file():
            if not local.is_file() or local.read_bytes() != copy.read_bytes():
                log.info("%s: continuing from the copy saved with %s (later records dropped)", name, checkpoint.name)
                tmp = local.with_name(name + ".tmp")
                shutil.copyfile(copy, tmp)
                os.replace(tmp, local)
        elif local.is_file():
            drop_records_after(local, limit)


def drop_records_after(path: Path, limit: int) -> int:
    """Remove the records of steps after `limit` (and any half-written line) from a JSONL log."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by a kill
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int | float) and step > limit:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        log.info("%s: dropped %d records of steps after %d (they are trained again)", path.name, dropped, max(limit, 0))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class OutputSession:
    """Owns a run's output directory: checkpoints, resume, status, final artifacts.

    `local_dir` is where the trainer writes (its `output_dir`). `keep_last` (`checkpoint.keepLast`)
    is applied here, not by transformers' `save_total_limit`: transformers deletes the previous
    checkpoint as soon as it has written the new one's files, before the manifest marks the new
    one complete, so a kill in between (hashing takes minutes on a large model) left no complete
    checkpoint at all. `rotate_checkpoints` runs only once a newer checkpoint is complete.
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
        disk's files (a shared disk already holds every rank's files). The run logs are copied in
        first (`snapshot_run_logs`); rotation follows the manifest, never precedes it."""
        snapshot_run_logs(self.local_dir, path)
        write_manifest(path, step)
        self.rotate_checkpoints()

    def rotate_checkpoints(self, busy: Collection[str] = ()) -> list[Path]:
        """Delete local checkpoints older than the newest `keep_last` complete ones.

        Only complete checkpoints count towards `keep_last`, so the newest complete one is never
        deleted, nor anything newer (a checkpoint still being saved or uploaded); an incomplete one
        older than every kept checkpoint is garbage and goes too. `busy`: names still in use (an
        upload in flight), left alone."""
        if not self.keep_last:
            return []
        found = list_checkpoints(self.local_dir)
        complete = [step for step, path in found if self._counts_as_complete(path)]
        if len(complete) <= self.keep_last:
            return []
        oldest_kept = complete[-self.keep_last]
        removed = []
        for step, path in found:
            if step < oldest_kept and path.name not in busy:
                log.info("rotation: deleting %s (keeping the newest %d complete checkpoints)", path, self.keep_last)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _counts_as_complete(self, checkpoint: Path) -> bool:
        """Whether a local checkpoint directory may let older ones be rotated away."""
        return read_manifest(checkpoint) is not None

    def rewind_run_logs(self, checkpoint: Path | None) -> None:
        """Before a run appends to its logs: see `rewind_run_logs` (rank 0 only, the writer)."""
        rewind_run_logs(self.local_dir, checkpoint)

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
    body = read_output_file(output, STATUS_NAME, settings, **timeouts)
    try:
        data = json.loads(body.decode()) if body is not None else None
    except ValueError:  # half-written: the caller reads again later
        return None
    return data if isinstance(data, dict) else None


def read_output_file(output: str, name: str, settings: StorageSpec | None = None, **timeouts: float) -> bytes | None:
    """The bytes of the file `name` under `output` (local path or `s3://` prefix), or None when it
    does not exist or cannot be read: never raises."""
    from kubetune.trainer.artifacts.stream import open_stream

    try:
        with open_stream(f"{output.rstrip('/')}/{name}", settings, field="output.path", **timeouts) as handle:
            return handle.read()
    except Exception:  # absent, unreachable: the caller treats it as not there
        return None


#END
