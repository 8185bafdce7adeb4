"""`kubetune storage gc`: evict least-recently-used entries from the local cache.

What counts as one entry (everything else under the cache root is left alone: `outputs/`, the
staging directories of `s3://` outputs, may hold a running job's unuploaded checkpoints):
- `s3/<bucket>/<key>`: one localized URI (`cache.py`), a single file or a whole prefix (a model
  directory is one entry), with its meta records and lock under `s3-meta/<bucket>/`. URIs that
  overlap (a prefix and a file in it) form one entry, locked and removed together;
- `merged/<hash>/`: a LoRA adapter merged into its base (`models/loader.py`);
- `datasets/datasets/<key>/`: a tokenized-dataset entry of the local `data.cache: auto` cache
  (`data/cache.py`).

"Last used" is the newest of: the lock's mtime (stamped whenever the URI is served, see
`cache.mark_used`; for a directory entry, the directory's mtime, which `mark_used` also stamps),
and each file's mtime and atime (on `relatime` mounts reads show up, at worst a day late;
directories' atimes are not used: listing them, as gc does, changes them). Safety against concurrent users:
- an `s3/` entry is removed only while holding its lock(s), taken without waiting: an entry being
  localized is skipped. Its meta records go first, then the files (a half-removed entry reads as
  "not cached" and is downloaded again, never served partially), the lock files last;
- a `merged/` or `datasets/` directory is first renamed to a hidden name (atomic: readers see the
  whole entry or none, and rebuild it), then deleted.
A process that already holds a path from the cache and is still reading it is not protected:
files it has open stay readable, files it opens later are gone. Run gc with `--older-than` longer
than any job, or between jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.artifacts.cache import lock_is_current

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DATASET_MARKER = "kubetune-dataset.json"  # data/cache.py's MARKER (not imported: it loads `datasets`)


def parse_size(text: str, option: str = "--max-size") -> int:
    """`50G`, `500MiB`, `1.5T`, `0`, `123456` (bytes); binary units (G = GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgtp]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise SpecError(option, f"{text!r} is not a size.", "write e.g. 50G, 500M or 2T (binary units).")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_age(text: str, option: str = "--older-than") -> float:
    """`7d`, `12h`, `1d12h`, `30m`, `2w`, `90s` -> seconds."""
    compact = text.strip().lower()
    if not re.fullmatch(r"(?:\d+(?:\.\d*)?[smhdw])+", compact):
        raise SpecError(option, f"{text!r} is not a duration.", "write e.g. 7d, 12h, 1d12h, 30m or 2w.")
    return sum(float(n) * _SECONDS[unit] for n, unit in re.findall(r"(\d+(?:\.\d*)?)([smhdw])", compact))


@dataclass
class Entry:
    """One evictable unit of the cache."""

    kind: str  # "s3", "merged" or "dataset"
    name: str  # what the table shows: the s3:// URI, or the path below the cache root
    size: int = 0
    last_used: float = 0.0
    data: list[Path] = field(default_factory=list)  # files (s3) or the directory (others)
    meta: list[Path] = field(default_factory=list)  # s3 meta records: removed before `data`
    locks: list[Path] = field(default_factory=list)  # s3 locks: held while removing, removed last
    dirs: list[Path] = field(default_factory=list)  # s3 directories to prune when empty


@dataclass
class Decision:
    entry: Entry
    reason: str  # "age" or "size"
    removed: bool = False
    skipped: str | None = None  # why it was kept after all (locked, used meanwhile)


@dataclass
class GcReport:
    decisions: list[Decision]
    total_before: int
    entries_before: int
    dry_run: bool

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if d.skipped is None]

    @property
    def freed(self) -> int:
        return sum(d.entry.size for d in self.removed)


# -- scanning ---------------------------------------------------------------------------------


def _walk(path: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file at or below `path` (not following links), with its lstat."""
    try:
        info = path.lstat()
    except OSError:
        return
    if not path.is_dir() or path.is_symlink():
        yield path, info
        return
    for directory, _subdirs, files in os.walk(path):
        for name in files:
            file = Path(directory, name)
            with contextlib.suppress(OSError):
                yield file, file.lstat()


def _subdirs(path: Path) -> list[Path]:
    """`path` and the directories below it, deepest first (the order to prune them in)."""
    if not path.is_dir() or path.is_symlink():
        return []
    found = [Path(d) for d, _s, _f in os.walk(path)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _used(info: os.stat_result) -> float:
    return max(info.st_mtime, info.st_atime)


def _s3_key_of(lock: Path, bucket_meta: Path) -> str:
    key = lock.relative_to(bucket_meta).as_posix()[: -len(".lock")]
    return "" if key == "_bucket" else key


def _s3_entry(root: Path, bucket: str, key: str, locks: list[Path]) -> Entry:
    """The entry of the URI `s3://bucket/key` (and the overlapping URIs whose `locks` are given)."""
    data_path = root / "s3" / bucket / key if key else root / "s3" / bucket
    meta_base = root / "s3-meta" / bucket
    meta_dir = meta_base / key if key else meta_base
    entry = Entry("s3", f"s3://{bucket}/{key}" + ("/" if data_path.is_dir() else ""), locks=sorted(locks))
    for file, info in _walk(data_path):
        entry.data.append(file)
        entry.size += info.st_size
        entry.last_used = max(entry.last_used, _used(info))
    metas = [meta_base / f"{key}.json"] if key else []
    for file, info in [*(x for m in metas for x in _walk(m)), *_walk(meta_dir)]:
        if file.suffix == ".lock":
            continue
        entry.meta.append(file)
        entry.size += info.st_size
        entry.last_used = max(entry.last_used, _used(info))
    for lock in locks:
        with contextlib.suppress(OSError):
            entry.last_used = max(entry.last_used, _used(lock.stat()))
    entry.dirs = [*(_subdirs(data_path) if key else []), *(_subdirs(meta_dir) if key else [])]
    return entry


def _s3_entries(root: Path) -> list[Entry]:
    entries = []
    meta_root = root / "s3-meta"
    if not meta_root.is_dir():
        return entries
    for bucket_meta in sorted(p for p in meta_root.iterdir() if p.is_dir()):
        locks: dict[str, Path] = {_s3_key_of(lock, bucket_meta): lock for lock in bucket_meta.rglob("*.lock")}
        groups: dict[str, list[Path]] = {}
        for key, lock in locks.items():
            parts = key.split("/") if key else []
            ancestors = ["", *("/".join(parts[:n]) for n in range(1, len(parts)))]
            group = next((a for a in ancestors if a in locks and a != key), key)
            groups.setdefault(group, []).append(lock)
        for key, members in sorted(groups.items()):
            entry = _s3_entry(root, bucket_meta.name, key, members)
            if entry.data or entry.meta:
                entries.append(entry)
    return entries


def _directory_entry(kind: str, directory: Path, root: Path) -> Entry:
    entry = Entry(kind, directory.relative_to(root).as_posix() + "/", data=[directory])
    with contextlib.suppress(OSError):  # a directory's atime changes when gc lists it: mtime only
        entry.last_used = directory.stat().st_mtime
    for _file, info in _walk(directory):
        entry.size += info.st_size
        entry.last_used = max(entry.last_used, _used(info))
    return entry


def _directory_entries(kind: str, parent: Path, root: Path) -> list[Entry]:
    """The non-hidden directories in `parent` (hidden ones are being built or removed)."""
    if not parent.is_dir():
        return []
    children = sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    return [_directory_entry(kind, child, root) for child in children]


def scan(root: Path) -> list[Entry]:
    """Every entry of the cache at `root`."""
    return [
        *_s3_entries(root),
        *_directory_entries("merged", root / "merged", root),
        *_directory_entries("dataset", root / "datasets" / "datasets", root),
    ]


# -- removing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _try_locks(locks: list[Path]) -> Iterator[str | None]:
    """Take every lock without waiting; yields None holding them all, else why not (holding none)."""
    held: list[int] = []
    try:
        for lock in locks:
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                yield "already gone"
                return
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield "locked: being downloaded"
                return
            if not lock_is_current(fd, lock):
                yield "already gone"
                return
        yield None
    finally:
        for fd in reversed(held):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _remove_s3(root: Path, entry: Entry, not_used_since: float | None) -> str | None:
    """Remove an s3 entry under its locks; the reason it was kept, or None."""
    with _try_locks(entry.locks) as busy:
        if busy:
            return busy
        # Rescan under the lock: the entry may have been served or refreshed since the scan.
        bucket_meta = root / "s3-meta" / entry.locks[0].relative_to(root / "s3-meta").parts[0]
        keys = sorted((_s3_key_of(lock, bucket_meta) for lock in entry.locks), key=len)
        fresh = _s3_entry(root, bucket_meta.name, keys[0], entry.locks)
        if fresh.last_used > (not_used_since if not_used_since is not None else entry.last_used):
            return "used meanwhile"
        for file in fresh.meta:  # first: what is left reads as "not cached"
            file.unlink(missing_ok=True)
        for file in fresh.data:
            file.unlink(missing_ok=True)
        for lock in entry.locks:  # last, still held: a waiter re-checks and locks a new file
            lock.unlink(missing_ok=True)
        for directory in fresh.dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: a concurrent newcomer keeps its directory
    return None


def _remove_directory(entry: Entry) -> str | None:
    directory = entry.data[0]
    hidden = directory.with_name(f".{directory.name}.stale-gc-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(directory, hidden)  # atomic: the entry is gone for every reader at once
    except FileNotFoundError:
        return "already gone"
    except OSError as exc:
        return f"cannot remove: {exc.strerror or exc}"
    shutil.rmtree(hidden, ignore_errors=True)
    return None


# -- the policy -------------------------------------------------------------------------------


def collect(
    root: Path,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Remove entries not used for `older_than` seconds, then least-recently-used ones until the
    cache holds at most `max_size` bytes (entries that cannot be removed are kept and counted)."""
    now = time.time() if now is None else now
    entries = sorted(scan(root), key=lambda e: e.last_used)
    total = sum(e.size for e in entries)
    cutoff = None if older_than is None else now - older_than
    decisions: list[Decision] = []
    remaining = total
    for entry in entries:
        if cutoff is not None and entry.last_used < cutoff:
            reason = "age"
        elif max_size is not None and remaining > max_size:
            reason = "size"
        else:
            continue
        decision = Decision(entry, reason)
        if not dry_run:
            # An age decision holds if the entry is still older than the cutoff; a size decision
            # if the entry was not used after the scan.
            since = cutoff if reason == "age" else None
            decision.skipped = _remove_s3(root, entry, since) if entry.kind == "s3" else _remove_directory(entry)
        elif entry.kind == "s3":
            with _try_locks(entry.locks) as busy:
                decision.skipped = busy
        if decision.skipped is None:
            remaining -= entry.size
        decisions.append(decision)
    return GcReport(decisions, total, len(entries), dry_run)

