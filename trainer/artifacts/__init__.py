"""Where inputs come from and outputs go: local paths and `s3://` URIs behind one interface.

The trainer calls only these two entry points:
- `localize(location, settings, field=...)` -> a local path for a model or dataset location;
- `open_output(location, settings)` -> an `OutputSession` that owns the output directory:
  checkpoint completion markers, resume, status.json, and (for S3) uploads.
"""

from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import is_s3
from kubetune.trainer.artifacts.output import OutputSession, localize

__all__ = ["OutputSession", "localize", "open_output"]


def open_output(location: str, settings: StorageSpec | None = None, *, keep_last: int | None = None) -> OutputSession:
    """The output session for a local directory or an `s3://` prefix."""
    if is_s3(location):
        from kubetune.trainer.artifacts.s3output import S3OutputSession

        return S3OutputSession(location, settings, keep_last=keep_last)
    return OutputSession(location, settings, keep_last=keep_last)
