"""`kubetune storage gc`: LRU/age eviction of the local cache, safe against concurrent users."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from kubetune.trainer.artifacts import localize
from kubetune.trainer.artifacts.cache import _locked
from kubetune.trainer.artifacts.gc import parse_age, parse_size
from kubetune.trainer.cli.storage import main
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

HOUR = 3600.0


def _gc(cache: Path, *argv: str) -> int:
    return main(["storage", "gc", "--cache-dir", str(cache), *argv])


def _backdate(when: float, *paths: Path) -> None:
    """Set atime and mtime of every file (and directory) at or below `paths`."""
    for path in paths:
        if not path.exists():
            continue
        for item in [*path.rglob("*"), path] if path.is_dir() else [path]:
            os.utime(item, (when, when))


def _s3_paths(s3: S3Env, key: str) -> list[Path]:
    meta = s3.cache / "s3-meta" / s3.bucket
    return [s3.cache / "s3" / s3.bucket / key, meta / key, meta / f"{key}.json", meta / f"{key}.lock"]


def _cached(s3: S3Env, key: str) -> bool:
    return (s3.cache / "s3" / s3.bucket / key).exists()


def test_lru_order_served_entries_count_as_used_and_evicted_files_come_back(
    s3: S3Env, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.put("models/a/config.json", "{}")
    s3.put("models/a/weights.bin", b"a" * 40_000)
    s3.put("data/b.jsonl", b"b" * 20_000)
    s3.put("data/c.jsonl", b"c" * 20_000)
    settings = s3.settings()
    # models/a/config.json overlaps models/a (shares its files): one entry with it.
    for uri in ("models/a", "models/a/config.json", "data/b.jsonl", "data/c.jsonl"):
        localize(s3.uri(uri), settings, field="f")
    now = time.time()
    _backdate(now - 3 * HOUR, *_s3_paths(s3, "models/a"))
    _backdate(now - 2 * HOUR, *_s3_paths(s3, "data/b.jsonl"))
    _backdate(now - 1 * HOUR, *_s3_paths(s3, "data/c.jsonl"))
    gets = s3.proxy.count("GET", objects_only=True)
    localize(s3.uri("data/b.jsonl"), settings, field="f")  # served from the cache: now the newest
    assert s3.proxy.count("GET", objects_only=True) == gets

    assert _gc(s3.cache, "--max-size", "0", "--dry-run") == 0
    assert "would remove 3 of 3 entries" in capsys.readouterr().out
    assert all(_cached(s3, key) for key in ("models/a/weights.bin", "data/b.jsonl", "data/c.jsonl"))

    # ~80 KB cached: the model directory is the least recently used, and goes as one entry.
    assert _gc(s3.cache, "--max-size", "60K") == 0
    out = capsys.readouterr().out
    assert f"s3://{s3.bucket}/models/a/" in out and "removed 1 of 3 entries" in out
    assert not _cached(s3, "models/a") and _cached(s3, "data/b.jsonl") and _cached(s3, "data/c.jsonl")
    meta = s3.cache / "s3-meta" / s3.bucket
    assert not (meta / "models" / "a").exists() and not (meta / "models" / "a.lock").exists()
    assert not (s3.cache / "s3" / s3.bucket / "models" / "a").exists()

    assert _gc(s3.cache, "--max-size", "25K") == 0  # c, not b: b was served after c
    assert "data/c.jsonl" in capsys.readouterr().out
    assert not _cached(s3, "data/c.jsonl") and _cached(s3, "data/b.jsonl")

    # Evicted entries are downloaded again, in full, by the next localize.
    before = s3.proxy.count("GET", objects_only=True)
    model = localize(s3.uri("models/a"), settings, field="f")
    assert (model / "weights.bin").read_bytes() == b"a" * 40_000
    assert (model / "config.json").read_text() == "{}"
    assert s3.proxy.count("GET", objects_only=True) == before + 2
    assert localize(s3.uri("data/c.jsonl"), settings, field="f").read_bytes() == b"c" * 20_000


def test_locked_entry_survives_and_a_waiter_relocks_a_removed_lock_file(
    s3: S3Env, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.put("data/busy.jsonl", b"x" * 5000)
    s3.put("data/idle.jsonl", b"y" * 5000)
    settings = s3.settings()
    for key in ("data/busy.jsonl", "data/idle.jsonl"):
        localize(s3.uri(key), settings, field="f")
    lock = s3.cache / "s3-meta" / s3.bucket / "data" / "busy.jsonl.lock"
    with lock.open("a") as handle:  # another process is localizing this URI right now
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert _gc(s3.cache, "--max-size", "0") == 0
        fcntl.flock(handle, fcntl.LOCK_UN)
    out = capsys.readouterr().out
    assert "kept" in out and "locked" in out
    assert _cached(s3, "data/busy.jsonl") and not _cached(s3, "data/idle.jsonl")
    assert (s3.cache / "s3-meta" / s3.bucket / "data" / "busy.jsonl.json").is_file()

    # gc deletes a lock file while holding it; a process that was waiting on the old file must
    # notice and lock the file now at that path, or two processes would both "hold" the lock.
    gc_side = os.open(lock, os.O_RDWR)
    fcntl.flock(gc_side, fcntl.LOCK_EX)
    entered, leave = threading.Event(), threading.Event()

    def waiter() -> None:
        with _locked(lock):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=waiter)
    thread.start()
    inode = os.stat(lock).st_ino  # wait until the waiter is blocked on the old file (a "->" line in /proc/locks)
    deadline = time.monotonic() + 10
    while not any(" -> " in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines()):
        assert time.monotonic() < deadline and thread.is_alive(), "the waiter never blocked on the lock"
        time.sleep(0.01)
    lock.unlink()
    os.close(gc_side)  # releases the old inode
    assert entered.wait(10)
    probe = os.open(lock, os.O_RDWR)  # the new lock file, which the waiter must hold
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    leave.set()
    thread.join(10)


def test_interrupted_gc_leaves_an_entry_that_reads_as_not_cached(
    s3: S3Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("models/m/config.json", "{}")
    s3.put("models/m/weights.bin", b"w" * 30_000)
    settings = s3.settings()
    localize(s3.uri("models/m"), settings, field="f")
    data_root = s3.cache / "s3"
    real_unlink = Path.unlink

    def crash_on_data(self: Path, missing_ok: bool = False) -> None:
        if data_root in self.parents:
            raise KeyboardInterrupt  # killed after the meta records went, before the files
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_on_data)
    with pytest.raises(KeyboardInterrupt):
        _gc(s3.cache, "--max-size", "0")
    monkeypatch.undo()
    assert (data_root / s3.bucket / "models" / "m" / "weights.bin").is_file()  # data still there
    before = s3.proxy.count("GET", objects_only=True)
    model = localize(s3.uri("models/m"), settings, field="f")
    assert s3.proxy.count("GET", objects_only=True) == before + 2  # not served: downloaded again
    assert (model / "weights.bin").read_bytes() == b"w" * 30_000


def _entry(directory: Path, when: float, size: int = 1000, marker: str | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"0" * size)
    (directory / (marker or "config.json")).write_text("{}")
    _backdate(when, directory)
    return directory


def test_older_than_and_dry_run_on_merged_and_dataset_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    now = time.time()
    old_merged = _entry(cache / "merged" / "a1b2", now - 10 * 24 * HOUR, 4000)
    new_merged = _entry(cache / "merged" / "c3d4", now - HOUR)
    old_dataset = _entry(cache / "datasets" / "datasets" / "k0", now - 8 * 24 * HOUR, marker="kubetune-dataset.json")
    in_progress = _entry(cache / "merged" / ".merging-xyz", now - 30 * 24 * HOUR)  # being built
    staging = _entry(cache / "outputs" / "run-abc", now - 30 * 24 * HOUR)  # an s3 output's staging

    assert _gc(cache, "--older-than", "7d", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would remove" in out and "merged/a1b2/" in out and "datasets/datasets/k0/" in out
    assert "c3d4" not in out
    assert all(p.is_dir() for p in (old_merged, new_merged, old_dataset, in_progress, staging))

    assert _gc(cache, "--older-than", "7d") == 0
    out = capsys.readouterr().out
    assert "removed 2 of 3 entries" in out
    assert not old_merged.exists() and not old_dataset.exists()
    assert new_merged.is_dir() and in_progress.is_dir() and staging.is_dir()
    assert sorted(p.name for p in (cache / "merged").iterdir()) == [".merging-xyz", "c3d4"]  # no leftovers

    assert _gc(cache) == 2  # a limit is required
    assert "--max-size" in capsys.readouterr().err
    assert _gc(cache, "--max-size", "lots") == 2


def test_size_and_age_parsing() -> None:
    assert parse_size("50G") == 50 << 30 and parse_size("500MiB") == 500 << 20 and parse_size("0") == 0
    assert parse_size("1.5k") == 1536 and parse_size("2TB") == 2 << 40
    assert parse_age("7d") == 7 * 86400 and parse_age("1d12h") == 36 * 3600 and parse_age("30m") == 1800
    with pytest.raises(Exception, match="duration"):
        parse_age("7 days")
