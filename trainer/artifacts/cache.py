"""The local download cache for `s3://` inputs (models, datasets).

Layout under the cache root (`storage.cacheDir`, else `$KUBETUNE_CACHE`, else `~/.cache/kubetune`):
    s3/<bucket>/<key>               the files, mirroring their keys (what callers get back)
    s3-meta/<bucket>/<key>.json     per object: the ETag and size it was downloaded at, SHA-256
    s3-meta/<bucket>/<key>.lock     held while one process localizes that URI; its mtime is the
                                    URI's last use (stamped each time it is served: no S3 call)
A file counts as cached only when its meta record matches the current listing (ETag and size)
and the file has that size; the meta record is written after the verified file was renamed into
place, so a crash in between only costs a re-download. A changed object (new ETag) is downloaded
again; objects removed from a prefix are removed locally, so a model directory never mixes
versions. Overlapping URIs (a prefix and a file in it) share entries.

`kubetune storage gc` (`gc.py`) evicts entries: it takes the same lock without waiting (an entry
being localized is skipped), removes the meta records before the files (a half-removed entry
reads as not cached and is downloaded again), and deletes the lock file last, while holding it;
`_locked` therefore checks, once it holds a lock, that its file is still the one at that path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kubetune.trainer.api.errors import KubetuneError, SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri, safe_join
from kubetune.trainer.artifacts.client import get_client, translate
from kubetune.trainer.artifacts.transfer import ObjectInfo, Transfers, list_objects, remove_partials

log = logging.getLogger("kubetune.storage")


def cache_root(settings: StorageSpec | None = None) -> Path:
    configured = (settings.cacheDir if settings else None) or os.environ.get("KUBETUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kubetune"


def lock_is_current(fd: int, lock_file: Path) -> bool:
    """Whether the locked descriptor is still the file at `lock_file` (gc removes lock files while
    holding them: a lock taken on a removed file protects nothing)."""
    try:
        now, held = os.stat(lock_file), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Exclusive lock across processes (e.g. several torchrun ranks on one node)."""
    while True:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_file.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        if lock_is_current(handle.fileno(), lock_file):
            break
        handle.close()  # gc removed the file while we waited: lock the one at the path now
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def mark_used(path: Path) -> None:
    """Stamp a cache entry (its lock file, or a directory entry such as `merged/<hash>`) as used
    now, for `kubetune storage gc`'s least-recently-used order. Best effort, no S3 call."""
    with contextlib.suppress(OSError):
        os.utime(path)


def resolve_objects(client: object, uri: S3Uri, location: str, field: str) -> tuple[bool, list[ObjectInfo]]:
    """(is_single_file, objects) for a URI: an exact object wins over a prefix of the same name.
    One LIST request with MaxKeys=1 decides: the exact key sorts before every longer key."""
    if uri.key and not uri.key.endswith("/"):
        first = list_objects(client, uri.bucket, uri.key, max_keys=1)
        if first and first[0].key == uri.key:
            return True, first
    objects = [o for o in list_objects(client, uri.bucket, uri.prefix) if not o.key.endswith("/")]
    if not objects:
        raise SpecError(
            field,
            f"{location} does not exist (no object with that key and no objects under that prefix).",
            "check the URI with `kubetune storage ls`, or upload the data with `kubetune storage cp`.",
        )
    return False, objects


def _meta_matches(meta_file: Path, local: Path, info: ObjectInfo) -> bool:
    try:
        meta = json.loads(meta_file.read_text())
        return meta["etag"] == info.etag and meta["size"] == info.size and local.stat().st_size == info.size
    except (OSError, ValueError, KeyError):
        return False


def _write_meta(meta_file: Path, info: ObjectInfo, sha256: str) -> None:
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = meta_file.with_name(meta_file.name + ".tmp")
    tmp.write_text(json.dumps({"key": info.key, "etag": info.etag, "size": info.size, "sha256": sha256}))
    os.replace(tmp, meta_file)


def localize_s3(location: str, settings: StorageSpec | None = None, *, field: str) -> Path:
    """Download an S3 object or prefix into the cache (only what changed) and return its local path."""
    settings = settings or StorageSpec()
    uri = S3Uri.parse(location, field)
    root = cache_root(settings)
    data_root, meta_root = root / "s3" / uri.bucket, root / "s3-meta" / uri.bucket
    key_path = uri.key.rstrip("/")
    target = safe_join(data_root, key_path, location=location, field=field)
    lock_file = safe_join(meta_root, f"{key_path or '_bucket'}.lock", location=location, field=field)
    client = get_client(settings)
    try:
        with _locked(lock_file):
            single, objects = resolve_objects(client, uri, location, field)
            entries: list[tuple[ObjectInfo, Path, Path]] = []
            for info in objects:
                local = safe_join(data_root, info.key, location=location, field=field) if single else \
                    safe_join(target, uri.relative(info.key), location=location, field=field)
                entries.append((info, local, meta_root / f"{local.relative_to(data_root)}.json"))
            if not single:
                remove_partials(target)
                _remove_stale(target, {local for _, local, _ in entries}, meta_root, data_root)
            todo = [(info, local, meta) for info, local, meta in entries if not _meta_matches(meta, local, info)]
            if todo:
                total = sum(info.size for info, _, _ in todo)
                log.info("downloading %s: %d file(s), %.1f MB", location, len(todo), total / 1e6)
                with Transfers(settings, client) as transfers:
                    for _, local, meta in todo:
                        meta.unlink(missing_ok=True)
                        local.parent.mkdir(parents=True, exist_ok=True)
                    shas = transfers.download_verified(
                        [(info, local, None) for info, local, _ in todo], uri.bucket, f"download {uri.name}"
                    )
                for info, local, meta in todo:
                    _write_meta(meta, info, shas[local])
            else:
                log.info("%s is cached at %s", location, target)
            mark_used(lock_file)
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, location, field=field, action="download") from None
    return target


def _remove_stale(target: Path, keep: set[Path], meta_root: Path, data_root: Path) -> None:
    """Files under a cached prefix that the prefix no longer has (so versions never mix)."""
    if not target.is_dir():
        return
    for path in target.rglob("*"):
        if path.is_file() and path not in keep:
            path.unlink(missing_ok=True)
            (meta_root / f"{path.relative_to(data_root)}.json").unlink(missing_ok=True)
