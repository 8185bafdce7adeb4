"""`s3://bucket/key` URIs: parsing, joining, and mapping keys to safe local paths.

Kept free of boto3 so the spec checker and the CLI can validate locations without a client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kubetune.trainer.api.errors import SpecError

SCHEME = "s3://"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
"""Lenient bucket check: AWS rules plus the underscores some S3-compatible stores allow."""


def is_s3(location: str | object) -> bool:
    """True for `s3://...` strings; local paths (str or Path) are False."""
    return isinstance(location, str) and location.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key (the key may be empty, or a prefix ending in `/`)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str, field: str = "") -> S3Uri:
        """Parse and validate; a malformed URI is a `SpecError` naming `field`."""
        if not is_s3(uri):
            raise SpecError(field, f"{uri!r} is not an s3:// URI.", "write it as s3://bucket/prefix.")
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        if not bucket or not _BUCKET_RE.match(bucket):
            raise SpecError(
                field,
                f"{uri!r} has no valid bucket name.",
                "write it as s3://bucket/prefix (bucket names are lower-case letters, digits, '.' and '-').",
            )
        if unsafe_segments(key):
            raise SpecError(
                field,
                f"{uri!r} has a key with '..' or '.' segments or a leading '/'.",
                "write the key without them: s3://bucket/prefix/name (kubetune maps keys onto local paths).",
            )
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """The key as a directory prefix: empty (the whole bucket) or ending in `/`."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    @property
    def name(self) -> str:
        """Last path component (the bucket for a bucket root)."""
        return PurePosixPath(self.key.rstrip("/")).name or self.bucket

    def join(self, *parts: str) -> S3Uri:
        """A key below this one: `S3Uri('b', 'out').join('ckpt-1', 'a.bin')` -> `s3://b/out/ckpt-1/a.bin`."""
        key = self.prefix + "/".join(p.strip("/") for p in parts if p.strip("/"))
        return S3Uri(self.bucket, key)

    def relative(self, key: str) -> str:
        """`key` relative to this prefix (callers pass keys listed under it)."""
        return key[len(self.prefix) :]


def unsafe_segments(key: str) -> bool:
    """Whether a key (or relative path) would leave the directory it is joined to: a `..` or `.`
    segment, or a leading `/` (joining an absolute path replaces the root)."""
    return key.startswith("/") or any(part in ("..", ".") for part in key.split("/"))


def safe_join(root: Path, *parts: str, location: str = "", field: str = "") -> Path:
    """`root / part / ...` for parts that come from outside (object keys, URIs, request bodies),
    refusing any that would escape `root`. The one place where kubetune's storage layer and server
    turn user-supplied names into local paths: S3 allows any key, the local disk must not be
    written outside the cache. Empty parts are skipped (a bucket root maps to `root` itself)."""
    path = Path(root)
    for part in parts:
        if unsafe_segments(part):
            raise SpecError(
                field,
                f"object key {part!r}{f' under {location}' if location else ''} cannot be stored as a local file.",
                "rename the object (keys with '..' or '.' segments or a leading '/' are refused).",
            )
        path = path.joinpath(*(p for p in part.split("/") if p))
    if not is_within(path, root):  # belt and braces: a part the segment check did not foresee
        raise SpecError(field, f"{location or 'a key'} maps outside {root}.", "rename the object.")
    return path


def is_within(path: Path | str, root: Path | str) -> bool:
    """Whether `path` is `root` or below it, lexically (no `..` can climb out) and after following
    symlinks (a link inside `root` pointing elsewhere does not count as inside)."""
    import os.path

    lexical = os.path.normpath(os.path.abspath(path))
    base = os.path.normpath(os.path.abspath(root))
    if os.path.commonpath([lexical, base]) != base:
        return False
    real, real_base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_base]) == real_base


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def looks_like_local_path(location: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, a/b/c, x.jsonl) is a path."""
    return (
        location.startswith((".", "/", "~"))
        or location.count("/") > 1
        or location.lower().endswith(DATA_SUFFIXES)
    )
