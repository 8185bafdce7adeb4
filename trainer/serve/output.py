"""Where `kubetune generate` writes its JSONL: a local file, or an `s3://` object.

An S3 target is written to a local staging file while generating (lines are flushed as batches
finish, so progress is visible and nothing is held in memory), then uploaded once at the end with
the storage layer's verified upload (size and ETag checked). If the upload fails the staged file
is kept and the error names it, so hours of generation are not lost to a credentials typo.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kubetune.trainer.api.errors import KubetuneError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri, is_s3

DEFAULT_NAME = "generations.jsonl"
"""Object name used when the S3 target is a prefix (`s3://bucket/run/`)."""


def s3_target(out: str, field: str = "--out") -> S3Uri:
    """The object an `s3://` output goes to (a prefix gets `generations.jsonl`); validates early."""
    uri = S3Uri.parse(out, field)
    if not uri.key or out.endswith("/"):
        return S3Uri(uri.bucket, uri.prefix + DEFAULT_NAME)
    return uri


@contextlib.contextmanager
def open_output(out: str, storage: StorageSpec | None = None) -> Iterator[IO[str]]:
    """A text handle for the results; for `s3://` targets the file is uploaded on a clean exit."""
    if not is_s3(out):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            yield handle
        return
    target = s3_target(out)
    staging = Path(tempfile.mkdtemp(prefix="kubetune-generate-"))
    local = staging / Path(target.key).name
    with local.open("w") as handle:
        yield handle
    upload(local, target, storage)
    shutil.rmtree(staging, ignore_errors=True)


def upload(local: Path, target: S3Uri, storage: StorageSpec | None = None) -> None:
    """Upload `local` to `target`, verified; on failure the error says where the local copy is."""
    from kubetune.trainer.artifacts.client import translate
    from kubetune.trainer.artifacts.transfer import Transfers

    try:
        try:
            with Transfers(storage) as transfers:
                transfers.upload_file(local, target)
        except KubetuneError:
            raise
        except Exception as exc:
            raise translate(exc, str(target), field="--out", action="upload to") from None
    except KubetuneError as exc:
        error = KubetuneError(f"{exc} The generations are kept in {local}.")
        error.exit_code = exc.exit_code
        raise error from None
