"""Streaming reads of large dataset objects, for `data.streaming` (no full download, no cache).

`open_stream` returns a buffered, seekable binary file for a local path or an `s3://` object; it
reads with ranged GETs pinned to the object's ETag (`If-Match`), so a dropped connection resumes
at the same offset and an object replaced mid-read fails loudly instead of mixing versions.
Parquet needs seeks (footer first), which is why this is a seekable reader and not a plain body
stream. `iter_jsonl` / `iter_parquet_batches` walk a single file or every matching file below a
prefix/directory, in key order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from kubetune.trainer.api.errors import KubetuneError, SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri, is_s3
from kubetune.trainer.artifacts.cache import resolve_objects
from kubetune.trainer.artifacts.client import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    StorageError,
    get_client,
    translate,
)

READ_AHEAD = 8 * 1024 * 1024
"""Bytes fetched per ranged GET: large enough that request latency is amortised."""
_BODY_ATTEMPTS = 4


class S3RangeReader(io.RawIOBase):
    """A seekable raw reader over one S3 object (ranged GETs; see module docstring)."""

    def __init__(self, client: Any, bucket: str, key: str, size: int, etag: str):
        self._client, self._bucket, self._key = client, bucket, key
        self._size, self._etag, self._pos = size, etag, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._fetch(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _fetch(self, start: int, length: int) -> bytes:
        """GET bytes [start, start+length); the body read is retried on dropped connections."""
        last: Exception | None = None
        for _ in range(_BODY_ATTEMPTS):
            try:
                response = self._client.get_object(
                    Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{start + length - 1}",
                    IfMatch=f'"{self._etag}"',
                )
                data = response["Body"].read()
                if len(data) == length:
                    return data
                last = StorageError(f"short read: {len(data)} of {length} bytes")
            except ClientError:
                raise
            except (BotoCoreError, OSError) as exc:
                last = exc
        raise translate(last or StorageError("no data"), f"s3://{self._bucket}/{self._key}", action="stream")


def open_stream(
    location: str,
    settings: StorageSpec | None = None,
    *,
    field: str = "",
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> BinaryIO:
    """A buffered binary file for one local file or `s3://` object (seekable either way).
    `connect_timeout`/`read_timeout` (seconds, per request) go to `get_client`: pass short ones
    for a read that must give up quickly."""
    if not is_s3(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise SpecError(field, f"{location!r} is not a file.", "check the path.")
        return path.open("rb")
    uri = S3Uri.parse(location, field)
    client = get_client(settings or StorageSpec(), connect_timeout=connect_timeout, read_timeout=read_timeout)
    try:
        single, objects = resolve_objects(client, uri, location, field)
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, location, field=field, action="read") from None
    if not single:
        raise SpecError(field, f"{location} is a prefix, not a single object.", "use list_files() to stream each file.")
    info = objects[0]
    raw = S3RangeReader(client, uri.bucket, info.key, info.size, info.etag)
    return io.BufferedReader(raw, buffer_size=READ_AHEAD)  # type: ignore[return-value]


def list_files(
    location: str, settings: StorageSpec | None = None, *, field: str = "", suffixes: tuple[str, ...] = ()
) -> list[str]:
    """The files a location stands for: itself if it is one file, else every file below it (keys or
    paths in sorted order), optionally only those ending in one of `suffixes`."""
    if not is_s3(location):
        path = Path(location).expanduser()
        if path.is_file():
            return [str(path)]
        if not path.is_dir():
            raise SpecError(field, f"{location!r} does not exist.", "check the path.")
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file()]
    else:
        uri = S3Uri.parse(location, field)
        try:
            single, objects = resolve_objects(get_client(settings or StorageSpec()), uri, location, field)
        except KubetuneError:
            raise
        except Exception as exc:
            raise translate(exc, location, field=field, action="list") from None
        if single:
            return [location]
        files = [f"s3://{uri.bucket}/{o.key}" for o in objects]
    return [f for f in files if not suffixes or f.endswith(suffixes)]


def iter_jsonl(location: str, settings: StorageSpec | None = None, *, field: str = "") -> Iterator[dict[str, Any]]:
    """Records of one JSONL file/object, or of every `.jsonl` file below a prefix/directory."""
    for file in list_files(location, settings, field=field, suffixes=(".jsonl", ".json")):
        with open_stream(file, settings, field=field) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8")
            for number, line in enumerate(text, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise SpecError(field, f"{file} line {number} is not valid JSON ({exc}).", "fix the file.") from None


def iter_parquet_batches(
    location: str, settings: StorageSpec | None = None, *, field: str = "", batch_size: int = 1024
) -> Iterator[Any]:
    """pyarrow RecordBatches of one Parquet file/object, or of every `.parquet` file below a prefix."""
    import pyarrow.parquet as pq

    for file in list_files(location, settings, field=field, suffixes=(".parquet",)):
        with open_stream(file, settings, field=field) as raw:
            yield from pq.ParquetFile(raw).iter_batches(batch_size=batch_size)
