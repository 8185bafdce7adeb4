"""Where inputs come from and outputs go: local paths and `s3://` URIs behind one interface.

The trainer calls only these two entry points:
- `localize(location, settings, field=...)` -> a local path for a model or dataset location;
- `open_output(location, settings)` -> an `OutputSession` that owns the output directory:
  checkpoint completion markers, resume, status.json, and (for S3) uploads.
"""

from kubetune.trainer.artifacts.output import OutputSession, localize, open_output

__all__ = ["OutputSession", "localize", "open_output"]
