"""`python -m kubetune.trainer.serve.fetch`: the InferenceService pods' init container.

Downloads the model, its adapters (`--adapter NAME=URI`, and with vLLM the current set from
`--adapters-file`, the mounted adapters ConfigMap; plus the base model a LoRA output was trained
from, and a draft model) into the local cache at `$KUBETUNE_CACHE` with the storage layer: parallel ranged
GETs, verified, renamed into place atomically, one process per URI at a time (a file lock, so
replicas sharing a hostPath cache never download the same model twice). The cache is keyed by
each object's ETag: what is there at the same version is not downloaded again. The server
container (`kubetune serve` with the same URIs and the same `$KUBETUNE_CACHE`) then finds every
file in place. Prints one line per location and a JSON summary (for benchmarks and logs).

Exit codes: 0 done, 2 a location is wrong or unreadable (the message says which and why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import KubetuneError


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_remote(location: str) -> bool:
    return location.startswith("s3://")


def fetch_one(location: str, field: str, storage: Any) -> dict[str, Any]:
    """Localize one location; returns what was done (bytes in the cache, seconds, throughput)."""
    from kubetune.trainer.serve.loading import resolve_path

    started = time.perf_counter()
    path = resolve_path(location, storage, field)
    seconds = time.perf_counter() - started
    local = Path(path) if isinstance(path, Path) else None
    size = _size(local) if local is not None else 0
    return {
        "location": location,
        "path": str(path),
        "bytes": size,
        "seconds": round(seconds, 3),
        "MBps": round(size / 1e6 / seconds, 1) if seconds > 0 and size else None,
    }


def fetch(model: str, adapters: list[str], draft: str | None = None, storage: Any = None) -> list[dict[str, Any]]:
    """Localize everything a server with these arguments loads; returns one record per location."""
    from kubetune.trainer.api.spec import StorageSpec
    from kubetune.trainer.artifacts.adapters import adapter_base, is_adapter_dir, parse_adapter_arg

    storage = storage or StorageSpec()
    records = []
    wanted = [(model, "model")]
    for value in adapters:
        ref = parse_adapter_arg(value)
        wanted.append((ref.location, f"adapter {ref.name}"))
    if draft:
        wanted.append((draft, "draft model"))
    for location, field in wanted:
        record = fetch_one(location, field, storage)
        record["field"] = field
        records.append(record)
        local = Path(record["path"])
        # A LoRA output: the server loads the base it was trained on, too; a pipeline step's
        # adapter sits on the previous step's output, maybe an adapter itself: follow the chain.
        while field == "model" and local.is_dir() and is_adapter_dir(local):
            base, _ = adapter_base(local)
            if not (_is_remote(base) or base.startswith("builtin:")):
                break  # a local path or a hub id: nothing to put in the cache
            extra = fetch_one(base, "base model", storage)
            extra["field"] = "base model"
            records.append(extra)
            local = Path(extra["path"])
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.serve.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model location (s3:// prefix, directory, builtin:NAME)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=URI", help="an adapter (repeatable)")
    parser.add_argument("--adapters-file", metavar="PATH",
                        help="more adapters from a file as the operator writes it (the mounted adapters ConfigMap)")
    parser.add_argument("--draft-model", help="a draft model for speculative decoding")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    adapters = list(args.adapter)
    if args.adapters_file:
        from kubetune.trainer.serve.adapters import AdapterFileError, read_adapters_file

        try:
            adapters += [f"{name}={uri}" for name, uri in read_adapters_file(args.adapters_file).items()]
        except AdapterFileError as exc:
            print(f"kubetune fetch: {exc}", file=sys.stderr)
            return 2
    try:
        records = fetch(args.model, adapters, args.draft_model)
    except KubetuneError as exc:
        print(f"kubetune fetch: {exc}", file=sys.stderr)
        return exc.exit_code
    total = time.perf_counter() - started
    for r in records:
        rate = f", {r['MBps']} MB/s" if r["MBps"] else ""
        print(f"{r['field']}: {r['location']} -> {r['path']} ({r['bytes'] / 1e6:.1f} MB in {r['seconds']:.2f} s{rate})")
    print(json.dumps({"fetched": records, "seconds": round(total, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
