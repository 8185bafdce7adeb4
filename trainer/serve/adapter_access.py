"""Which `lora_path`s `POST /v1/load_lora_adapter` may read, and how many adapters may be loaded.

The endpoint used to hand any string to the storage layer: a caller could make the server read
any local directory or hub id, download from any bucket the pod's credentials reach, and tell
from the error text which paths exist. Now a `lora_path` must be a directory under the model
cache (where the InferenceService's `adapters` sidecar localizes adapters) or under an
`--adapter-root` directory, or an `s3://` URI under an `--adapter-root` prefix. Anything else,
and anything that turns out not to hold an adapter, gets one fixed message that repeats neither
the path nor what is (or is not) there; the details go to the server's log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri, is_s3, is_within
from kubetune.trainer.serve.guards import ApiError
from kubetune.trainer.serve.protocol import DEFAULT_MAX_ADAPTERS

log = logging.getLogger(__name__)



@dataclass
class AdapterAccess:
    """The local directories and `s3://` prefixes adapters may be loaded from, and the cap."""

    local_roots: list[Path] = field(default_factory=list)
    s3_roots: list[S3Uri] = field(default_factory=list)
    max_adapters: int = DEFAULT_MAX_ADAPTERS

    @classmethod
    def build(cls, roots: list[str], cache: Path, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> AdapterAccess:
        """From `--adapter-root` values (directories or `s3://` prefixes) and the cache directory
        (always allowed). A malformed root is a SpecError naming `--adapter-root`."""
        local = [cache.expanduser()] + [Path(r).expanduser() for r in roots if not is_s3(r)]
        s3 = [S3Uri.parse(r, "--adapter-root") for r in roots if is_s3(r)]
        if max_adapters < 1:
            raise SpecError("--max-adapters", f"must be at least 1, got {max_adapters}.")
        return cls(local, s3, max_adapters)

    def allows(self, location: str) -> bool:
        """Whether `location` (a request's `lora_path`) is under an allowed root; touches no store."""
        if is_s3(location):
            try:
                uri = S3Uri.parse(location)
            except SpecError:  # a bad bucket, or `..` in the key
                return False
            return any(root.bucket == uri.bucket and (uri.prefix.startswith(root.prefix)) for root in self.s3_roots)
        if ":" in location.split("/", 1)[0]:  # builtin:, hf://, another job's output: never a runtime adapter
            return False
        return self.allows_local(Path(location).expanduser())

    def allows_local(self, path: Path) -> bool:
        return any(is_within(path, root) for root in self.local_roots)


def refused(name: str) -> ApiError:
    return ApiError(400, f"Loading lora {name} failed: lora_path is not a LoRA adapter this server may load. It must "
                    "be a LoRA training output directory under the model cache or an --adapter-root directory, or an "
                    "s3:// URI under an --adapter-root prefix (see `kubetune serve --help`).",
                    param="lora_path", code="invalid_value")


async def localize_adapter(access: AdapterAccess, storage: StorageSpec, name: str, location: str) -> Path:
    """The local directory of the adapter at `location` (downloaded into the cache for `s3://`), or
    the fixed 400 of `refused` when it is outside the allowed roots or holds no adapter."""
    from kubetune.trainer.artifacts.adapters import is_adapter_dir
    from kubetune.trainer.serve.loading import resolve_path

    if not access.allows(location):
        log.warning("refused to load adapter %s from %r: outside the allowed roots", name, location)
        raise refused(name)
    try:
        path = await asyncio.to_thread(resolve_path, location, storage, f"adapter {name}")
    except Exception as exc:  # missing, unreachable store: the same answer, details in the log
        log.warning("loading adapter %s from %r failed: %s", name, location, exc)
        raise refused(name) from None
    if not isinstance(path, Path) or not access.allows_local(path) or not is_adapter_dir(path):
        log.warning("refused to load adapter %s from %r: no adapter_config.json under an allowed root", name, location)
        raise refused(name)
    return path


def adapter_limit(access: AdapterAccess, loaded: int) -> ApiError:
    return ApiError(409, f"This server already serves {loaded} LoRA adapters, its limit. Unload one first "
                    f"(/v1/unload_lora_adapter), or raise the limit with `kubetune serve --max-adapters` "
                    f"(now {access.max_adapters}).", param="lora_name", code="adapter_limit_reached")
