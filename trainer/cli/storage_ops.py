"""What `kubetune storage ls|cp|rm|gc` do (the parser is `storage.py`, which stays light)."""


from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import KubetuneError, SpecError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.api.uri import S3Uri, is_s3, safe_join
from kubetune.trainer.artifacts.cache import resolve_objects
from kubetune.trainer.artifacts.client import StorageError, get_client, translate
from kubetune.trainer.artifacts.transfer import (
    ObjectInfo,
    Transfers,
    iter_files,
    list_objects,
    upload_directory,
)


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `storage` command; user errors are printed as one paragraph."""
    try:
        if args.storage_command == "gc":
            _gc(args)
            return 0
        settings = StorageSpec(
            endpointUrl=args.endpoint_url, region=args.region, pathStyle=args.path_style,
            maxConcurrency=max(1, args.max_concurrency),
        )
        handler = {"ls": _ls, "cp": _cp, "rm": _rm}[args.storage_command]
        handler(args, settings)
    except KubetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# -- ls ---------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, settings: StorageSpec) -> None:
    if not is_s3(args.uri):
        path = Path(args.uri).expanduser()
        if not path.exists():
            raise SpecError("", f"{args.uri!r} does not exist.", "check the path.")
        children = sorted(path.rglob("*") if args.recursive else path.iterdir()) if path.is_dir() else [path]
        for child in children:
            shown = child.relative_to(path) if path.is_dir() else child
            print(f"{'PRE' if child.is_dir() else _size(child.stat().st_size):>12}  {shown}{'/' if child.is_dir() else ''}")
        return
    uri = S3Uri.parse(args.uri, "URI")
    client = get_client(settings)
    try:
        if args.recursive:
            objects = list_objects(client, uri.bucket, uri.key)
            prefixes: list[str] = []
        else:
            kwargs: dict[str, Any] = {"Bucket": uri.bucket, "Prefix": uri.key, "Delimiter": "/"}
            objects, prefixes = [], []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(**kwargs):
                prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                objects += [
                    ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'), o.get("LastModified"))
                    for o in page.get("Contents", [])
                ]
            if not objects and len(prefixes) == 1 and prefixes[0] == uri.key + "/":
                # `ls s3://b/dir` means the directory's contents, like a local ls.
                args.uri = str(S3Uri(uri.bucket, prefixes[0]))
                return _ls(args, settings)
    except Exception as exc:
        raise translate(exc, args.uri, action="list") from None
    if not objects and not prefixes:
        raise SpecError("", f"nothing found at {args.uri}.", "check the bucket and prefix.")
    for prefix in prefixes:
        print(f"{'PRE':>12}  {prefix}")
    for obj in objects:
        stamp = obj.last_modified.strftime("%Y-%m-%d %H:%M:%S") if obj.last_modified else ""
        print(f"{_size(obj.size):>12}  {stamp:19}  s3://{uri.bucket}/{obj.key}")


# -- cp ---------------------------------------------------------------------------------------


def _cp(args: argparse.Namespace, settings: StorageSpec) -> None:
    src, dst = args.src, args.dst
    if is_s3(src) and is_s3(dst):
        count, total = _copy_s3_to_s3(src, dst, settings)
    elif is_s3(src):
        count, total = _download(src, dst, settings)
    elif is_s3(dst):
        count, total = _upload(src, dst, settings)
    else:
        source = Path(src).expanduser()
        if not source.exists():
            raise SpecError("", f"{src!r} does not exist.", "check the path.")
        target = Path(dst).expanduser()
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            files = list(iter_files(target))
            count, total = len(files), sum(f.stat().st_size for f in files)
        else:
            if dst.endswith("/") or target.is_dir():
                target = target / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            count, total = 1, source.stat().st_size
    print(f"copied {count} file(s), {_size(total)}: {src} -> {dst}")


def _plan_s3_source(src: str, settings: StorageSpec) -> tuple[S3Uri, bool, list[Any]]:
    uri = S3Uri.parse(src, "SRC")
    try:
        single, objects = resolve_objects(get_client(settings), uri, src, "SRC")
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, src, field="SRC", action="read") from None
    return uri, single, objects


def _download(src: str, dst: str, settings: StorageSpec) -> tuple[int, int]:
    uri, single, objects = _plan_s3_source(src, settings)
    target = Path(dst).expanduser()
    if single:
        finals = [target / uri.name if dst.endswith("/") or target.is_dir() else target]
    else:
        finals = [safe_join(target, uri.relative(o.key), location=src, field="SRC") for o in objects]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Transfers(settings) as transfers:
            transfers.download_verified(
                [(o, f, None) for o, f in zip(objects, finals, strict=True)], uri.bucket, f"download {uri.name}"
            )
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, src, field="SRC", action="download") from None
    return len(objects), sum(o.size for o in objects)


def _upload(src: str, dst: str, settings: StorageSpec) -> tuple[int, int]:
    source = Path(src).expanduser()
    if not source.exists():
        raise SpecError("SRC", f"{src!r} does not exist.", "check the path.")
    if source.is_dir():
        return upload_directory(source, dst, settings)
    uri = S3Uri.parse(dst, "DST")
    key = uri.prefix + source.name if (not uri.key or dst.endswith("/")) else uri.key
    try:
        with Transfers(settings) as transfers:
            transfers.upload_file(source, S3Uri(uri.bucket, key))
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, dst, field="DST", action="upload to") from None
    return 1, source.stat().st_size


def _copy_s3_to_s3(src: str, dst: str, settings: StorageSpec) -> tuple[int, int]:
    uri, single, objects = _plan_s3_source(src, settings)
    target = S3Uri.parse(dst, "DST")
    client = get_client(settings)
    try:
        with Transfers(settings, client) as transfers:
            started = []
            for obj in objects:
                if single:
                    key = target.prefix + uri.name if (not target.key or dst.endswith("/")) else target.key
                else:
                    key = target.prefix + uri.relative(obj.key)
                source = {"Bucket": uri.bucket, "Key": obj.key}
                started.append((transfers.manager.copy(source, target.bucket, key), key, obj))
            for future, key, obj in started:
                future.result()
                size = client.head_object(Bucket=target.bucket, Key=key)["ContentLength"]
                if size != obj.size:
                    raise StorageError(f"copy to s3://{target.bucket}/{key} did not verify ({size} of {obj.size} bytes).")
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, dst, field="DST", action="copy to") from None
    return len(objects), sum(o.size for o in objects)


# -- rm ---------------------------------------------------------------------------------------


def _rm(args: argparse.Namespace, settings: StorageSpec) -> None:
    if not is_s3(args.uri):
        path = Path(args.uri).expanduser()
        if path.is_dir() and not args.recursive:
            raise SpecError("", f"{args.uri} is a directory.", "add --recursive to delete it and its contents.")
        if not path.exists():
            raise SpecError("", f"{args.uri!r} does not exist.", "check the path.")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"deleted {args.uri}")
        return
    uri = S3Uri.parse(args.uri, "URI")
    client = get_client(settings)
    try:
        exact = bool(uri.key) and any(o.key == uri.key for o in list_objects(client, uri.bucket, uri.key, max_keys=1))
        below = [o.key for o in list_objects(client, uri.bucket, uri.prefix)] if args.recursive else []
        if not exact and not below:
            if not args.recursive and list_objects(client, uri.bucket, uri.prefix, max_keys=1):
                raise SpecError("", f"{args.uri} is a prefix.", "add --recursive to delete everything below it.")
            raise SpecError("", f"nothing found at {args.uri}.", "check the bucket and key.")
        keys = ([uri.key] if exact else []) + below
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            response = client.delete_objects(Bucket=uri.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(f"cannot delete s3://{uri.bucket}/{first.get('Key')}: {first.get('Code')}.")
    except KubetuneError:
        raise
    except Exception as exc:
        raise translate(exc, args.uri, action="delete") from None
    print(f"deleted {len(keys)} object(s) at {args.uri}")


# -- gc ---------------------------------------------------------------------------------------


def _gc(args: argparse.Namespace) -> None:
    import time

    from kubetune.trainer.artifacts.cache import cache_root
    from kubetune.trainer.artifacts.gc import collect, parse_age, parse_size

    if args.max_size is None and args.older_than is None:
        raise SpecError("", "gc needs a limit.", "give --max-size (e.g. 50G) and/or --older-than (e.g. 7d).")
    max_size = None if args.max_size is None else parse_size(args.max_size)
    older_than = None if args.older_than is None else parse_age(args.older_than)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else cache_root()
    report = collect(root, max_size=max_size, older_than=older_than, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    if report.decisions:
        print(f"{'ACTION':<14}{'LAST USED':<21}{'SIZE':>11}  {'WHY':<6}ENTRY")
        for d in report.decisions:
            action = verb if d.skipped is None else "kept"
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.entry.last_used))
            note = f"  ({d.skipped})" if d.skipped else ""
            print(f"{action:<14}{stamp:<21}{_size(d.entry.size):>11}  {d.reason:<6}{d.entry.name}{note}")
    count = len(report.removed)
    left = report.total_before - report.freed
    print(
        f"{verb} {count} of {report.entries_before} entr{'y' if report.entries_before == 1 else 'ies'}, "
        f"{'would free' if report.dry_run else 'freed'} {_size(report.freed)}; "
        f"the cache at {root} {'would hold' if report.dry_run else 'holds'} {_size(left)}"
    )
    if max_size is not None and left > max_size:
        print(f"note: still above --max-size {_size(max_size)}: entries in use were kept", file=sys.stderr)

