"""Local implementation of the storage interface (S3 support extends it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from kubetune.trainer.errors import SpecError
from kubetune.trainer.spec import StorageSpec

MANIFEST_NAME = "kubetune-manifest.json"
"""Written last into a checkpoint: its presence (and matching sizes) marks the checkpoint complete."""
STATUS_NAME = "status.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def localize(location: str, settings: StorageSpec | None = None, *, field: str) -> Path:
    """Return a local path for an input location; it must exist."""
    path = Path(location).expanduser()
    if not path.exists():
        raise SpecError(field, f"{location!r} does not exist.", "check the path (relative paths are resolved from the current directory).")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path, step: int) -> dict[str, Any]:
    """Record every file of a checkpoint (size, sha256) and write the manifest last, atomically."""
    files = {}
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[file.relative_to(checkpoint).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    manifest = {"step": step, "files": files, "createdAt": time.time()}
    tmp = checkpoint / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, checkpoint / MANIFEST_NAME)
    return manifest


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
    """Owns a run's output directory: checkpoints, resume, status, final artifacts."""

    def __init__(self, location: str, settings: StorageSpec | None = None):
        self.location = location
        self.settings = settings or StorageSpec()
        self.local_dir = Path(location).expanduser()
        self.local_dir.mkdir(parents=True, exist_ok=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; incomplete ones (no valid manifest) are skipped."""
        for _step, path in reversed(list_checkpoints(self.local_dir)):
            if read_manifest(path) is not None:
                return path
        return None

    def checkpoint_saved(self, path: Path, step: int) -> None:
        """Called right after the trainer finished writing a checkpoint."""
        write_manifest(path, step)

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete checkpoints that never got a manifest (a run killed mid-save); keep the rest."""
        removed = []
        for _step, path in list_checkpoints(self.local_dir):
            if read_manifest(path) is None:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def write_status(self, status: dict[str, Any]) -> None:
        tmp = self.local_dir / (STATUS_NAME + ".tmp")
        tmp.write_text(json.dumps(status, indent=1, default=str))
        os.replace(tmp, self.local_dir / STATUS_NAME)

    def finalize(self) -> None:
        """Block until every output is durably stored (no-op locally)."""


def open_output(location: str, settings: StorageSpec | None = None) -> OutputSession:
    if location.startswith("s3://"):
        raise SpecError("output.path", "s3:// outputs are not available in this build.", "use a local path.")
    return OutputSession(location, settings)
