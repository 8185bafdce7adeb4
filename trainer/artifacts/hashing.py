"""One way to hash a whole file, for every storage module (checkpoint manifests, download checks).

A module of its own, with no third-party imports, so that local-only code (`output.py`) can use it
without loading boto3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hexdigest(path: Path | str, algorithm: str = "sha256") -> str:
    """The hex digest of a file's content (`algorithm`: any `hashlib` name, e.g. sha256, md5),
    read in blocks by `hashlib.file_digest`."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()
