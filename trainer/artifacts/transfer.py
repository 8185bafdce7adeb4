"""Uploads and downloads with verification, shared by the input cache, the output session and the CLI.

Every transfer goes through one s3transfer `TransferManager` per caller, so `maxConcurrency`
bounds files and multipart parts together. Integrity checks, beyond botocore's own per-request
checksums:
- upload: HEAD the object and compare its size and ETag with what we computed locally (the MD5,
  or for multipart objects the MD5 of the parts' MD5s); we also store the SHA-256 as
  `x-amz-meta-kubetune-sha256` so a later download can verify multipart objects end to end;
- download: compare the size, then the MD5 for single-part ETags, or the stored SHA-256 for
  multipart ones (objects uploaded by other tools without it are checked by size only).
Downloads always land in a hidden `.NAME.kubetune-part-*` file that is renamed into place only
after verification, so an interrupted transfer never leaves a complete-looking file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from boto3.s3.transfer import create_transfer_manager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster
from tqdm import tqdm

from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri
from kubetune.trainer.artifacts.client import StorageError, get_client, transfer_config
from kubetune.trainer.artifacts.hashing import file_hexdigest

SHA256_META = "kubetune-sha256"
PART_MARKER = ".kubetune-part-"
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_HASH_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. `etag` has its quotes stripped."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None = None


@dataclass(frozen=True)
class Digests:
    """What one read of a local file tells us: its SHA-256 and the ETag S3 should report."""

    size: int
    sha256: str
    etag: str


def list_objects(client: Any, bucket: str, prefix: str, *, max_keys: int | None = None) -> list[ObjectInfo]:
    """All objects whose key starts with `prefix` (paginated), in key order."""
    found: list[ObjectInfo] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if max_keys is not None:
        kwargs["MaxKeys"] = max_keys
    while True:
        page = client.list_objects_v2(**kwargs)
        for item in page.get("Contents", []):
            found.append(
                ObjectInfo(item["Key"], int(item["Size"]), item.get("ETag", "").strip('"'), item.get("LastModified"))
            )
            if max_keys is not None and len(found) >= max_keys:
                return found
        if not page.get("IsTruncated"):
            return found
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def file_digests(path: Path, settings: StorageSpec | None = None) -> Digests:
    """SHA-256 plus the expected S3 ETag (plain MD5, or multipart `md5(md5s)-N` with our part size)."""
    config = transfer_config(settings)
    size = path.stat().st_size
    multipart = size >= config.multipart_threshold
    part_size = ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size) if multipart else size
    sha, whole, part = hashlib.sha256(), hashlib.md5(), hashlib.md5()
    part_digests: list[bytes] = []
    in_part = 0
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            sha.update(block)
            if not multipart:
                whole.update(block)
                continue
            view = memoryview(block)
            while view:
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    part_digests.append(part.digest())
                    part, in_part = hashlib.md5(), 0
    if multipart:
        if in_part:
            part_digests.append(part.digest())
        etag = f"{hashlib.md5(b''.join(part_digests)).hexdigest()}-{len(part_digests)}"
    else:
        etag = whole.hexdigest()
    return Digests(size, sha.hexdigest(), etag)


def _encrypted_etag(head: dict[str, Any]) -> bool:
    """SSE-KMS and SSE-C objects have ETags that are not MD5s of the content."""
    return bool(head.get("SSECustomerAlgorithm")) or str(head.get("ServerSideEncryption", "")).startswith("aws:kms")


class _Progress(BaseSubscriber):
    def __init__(self, bar: tqdm | None):
        self._bar = bar

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(bytes_transferred)


def progress_bar(total: int, description: str) -> tqdm:
    """A byte progress bar on stderr; `KUBETUNE_PROGRESS=0` turns it off (e.g. in CI logs)."""
    disabled = os.environ.get("KUBETUNE_PROGRESS", "1") == "0"
    return tqdm(
        total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
        mininterval=1.0, disable=disabled, file=sys.stderr, leave=False,
    )


def partial_path(final: Path) -> Path:
    """Hidden temporary name next to `final` (same filesystem, so the rename is atomic)."""
    return final.parent / f".{final.name}{PART_MARKER}{uuid.uuid4().hex[:8]}"


class Transfers:
    """One transfer manager (bounded by `maxConcurrency`) plus verified upload/download helpers."""

    def __init__(self, settings: StorageSpec | None = None, client: Any = None):
        self.settings = settings or StorageSpec()
        self.client = client or get_client(self.settings)
        self.manager = create_transfer_manager(self.client, transfer_config(self.settings))

    def close(self, cancel: bool = False) -> None:
        self.manager.shutdown(cancel=cancel)

    def __enter__(self) -> Transfers:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close(cancel=exc_type is not None)

    # -- uploads ------------------------------------------------------------------------------

    def start_upload(self, local: Path, uri: S3Uri, digests: Digests, bar: tqdm | None = None) -> Any:
        """Begin uploading; returns the s3transfer future (call `.result()`)."""
        extra = {"Metadata": {SHA256_META: digests.sha256}}
        return self.manager.upload(str(local), uri.bucket, uri.key, extra_args=extra, subscribers=[_Progress(bar)])

    def verify_upload(self, uri: S3Uri, digests: Digests) -> dict[str, Any]:
        """HEAD the uploaded object: size and ETag must match what was computed locally."""
        head = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        size, etag = int(head["ContentLength"]), head.get("ETag", "").strip('"')
        if size != digests.size:
            raise StorageError(f"upload of {uri} did not verify: S3 has {size} bytes, the local file {digests.size}.")
        if etag != digests.etag and not _encrypted_etag(head):
            raise StorageError(f"upload of {uri} did not verify: ETag {etag} differs from the local {digests.etag}.")
        return head

    def upload_file(self, local: Path, uri: S3Uri, digests: Digests | None = None) -> Digests:
        """Upload one file and verify it (blocking)."""
        digests = digests or file_digests(local, self.settings)
        self.start_upload(local, uri, digests).result()
        self.verify_upload(uri, digests)
        return digests

    # -- downloads ----------------------------------------------------------------------------

    def start_download(self, info: ObjectInfo, bucket: str, target: Path, bar: tqdm | None = None) -> Any:
        target.parent.mkdir(parents=True, exist_ok=True)
        return self.manager.download(bucket, info.key, str(target), subscribers=[_Progress(bar)])

    def verify_download(self, tmp: Path, info: ObjectInfo, bucket: str, expected_sha256: str | None = None) -> str:
        """Check a downloaded temp file against the listing (size, MD5/SHA-256). Returns its SHA-256."""
        uri = f"s3://{bucket}/{info.key}"
        size = tmp.stat().st_size
        if size != info.size:
            raise StorageError(f"download of {uri} is incomplete: {size} of {info.size} bytes.")
        sha = file_hexdigest(tmp, "sha256")
        if expected_sha256 is None and "-" in info.etag:
            head = self.client.head_object(Bucket=bucket, Key=info.key, IfMatch=f'"{info.etag}"')
            expected_sha256 = head.get("Metadata", {}).get(SHA256_META)
        if expected_sha256 is not None and sha != expected_sha256:
            raise StorageError(f"download of {uri} is corrupt: SHA-256 {sha} differs from the recorded {expected_sha256}.")
        if expected_sha256 is None and _MD5_ETAG.match(info.etag) and file_hexdigest(tmp, "md5") != info.etag:
            head = self.client.head_object(Bucket=bucket, Key=info.key)
            if not _encrypted_etag(head):
                raise StorageError(f"download of {uri} is corrupt: its MD5 differs from the ETag {info.etag}.")
        return sha

    def download_verified(
        self, items: list[tuple[ObjectInfo, Path, str | None]], bucket: str, description: str
    ) -> dict[Path, str]:
        """Download objects to their final paths in parallel: each to a hidden partial file, verified,
        then renamed into place. On any failure the partial files are removed and the error raised.
        `items` are (object, final path, expected sha256 or None). Returns {final path: sha256}."""
        results: dict[Path, str] = {}
        if not items:
            return results
        staged: list[tuple[Any, ObjectInfo, Path, Path, str | None]] = []
        bar = progress_bar(sum(info.size for info, _, _ in items), description)
        try:
            for info, final, sha in items:
                tmp = partial_path(final)
                staged.append((self.start_download(info, bucket, tmp, bar), info, final, tmp, sha))
            for future, info, final, tmp, sha in staged:
                future.result()
                results[final] = self.verify_download(tmp, info, bucket, sha)
                os.replace(tmp, final)
        except BaseException:
            for future, *_ in staged:
                with contextlib.suppress(Exception):
                    future.cancel()
            for future, *_ in staged:
                with contextlib.suppress(BaseException):
                    future.result()
            for _, _, _, tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        return results


def upload_directory(local_dir: Path | str, uri: str, settings: StorageSpec | None = None) -> tuple[int, int]:
    """Upload every file below `local_dir` to the `s3://` prefix `uri`, in parallel, each verified.
    Returns (files, bytes). Errors are user messages naming the URI."""
    from kubetune.trainer.api.errors import KubetuneError
    from kubetune.trainer.artifacts.client import translate

    source, target = Path(local_dir), S3Uri.parse(uri, "output")
    plan = [(f, target.join(f.relative_to(source).as_posix())) for f in iter_files(source)]
    try:
        with Transfers(settings) as transfers:
            started = []
            for local, dest in plan:
                digests = file_digests(local, transfers.settings)
                started.append((transfers.start_upload(local, dest, digests), dest, digests))
            for future, dest, digests in started:
                future.result()
                transfers.verify_upload(dest, digests)
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, uri, action="upload to") from None
    return len(plan), sum(local.stat().st_size for local, _ in plan)


def remove_partials(directory: Path) -> None:
    """Delete leftover partial files of interrupted downloads (callers hold the cache lock)."""
    if directory.is_dir():
        for leftover in directory.rglob(f"*{PART_MARKER}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


def iter_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and PART_MARKER not in path.name:
            yield path
