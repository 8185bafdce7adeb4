"""`kubetune storage ls|cp|rm|gc`: the common S3 operations without the AWS CLI in the images,
and garbage collection of the local download cache (`gc`, see `gc.py`).

Either side of `cp` may be local or `s3://`; a prefix or directory is copied recursively (its
contents go below the destination, like `aws s3 cp --recursive`). Same settings and credentials
as the trainer (standard AWS chain; `--endpoint-url` or `AWS_ENDPOINT_URL_S3` for MinIO/Ceph).
Downloads are verified and atomic; uploads are verified against S3's ETag. Bad input exits 2.
"""

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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `storage` (with `ls`, `cp`, `rm`, `gc`) on the main CLI's subparsers; the handler is
    `args.func(args) -> exit code`."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("S3 endpoint (default: AWS, or AWS_ENDPOINT_URL_S3)")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    group.add_argument("--region", help="bucket region (default: AWS_REGION / shared config)")
    group.add_argument("--path-style", action="store_true", help="address buckets as endpoint/bucket")
    group.add_argument("--max-concurrency", type=int, default=8, help="parallel transfers (default 8)")

    parser = subparsers.add_parser(
        "storage",
        help="list, copy and delete local or s3:// files",
        description=__doc__.split("\n\n")[0],
    )
    commands = parser.add_subparsers(dest="storage_command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", parents=[common], help="list a prefix or directory")
    ls.add_argument("uri", help="s3://bucket/prefix or a local path")
    ls.add_argument("-r", "--recursive", action="store_true", help="list every object below the prefix")
    cp = commands.add_parser("cp", parents=[common], help="copy files or prefixes (recursive)")
    cp.add_argument("src")
    cp.add_argument("dst")
    rm = commands.add_parser("rm", parents=[common], help="delete an object (or a prefix with --recursive)")
    rm.add_argument("uri")
    rm.add_argument("-r", "--recursive", action="store_true", help="delete everything below the prefix")
    gc = commands.add_parser(
        "gc",
        help="evict least-recently-used entries from the local download cache",
        description="Remove cached downloads (s3/), merged adapters (merged/) and tokenized datasets "
        "(datasets/) not used for --older-than, then least-recently-used ones until the cache is "
        "under --max-size. Entries being downloaded are skipped. Makes no S3 request.",
    )
    gc.add_argument("--max-size", metavar="SIZE", help="evict LRU entries until the cache holds at most this (50G, 500M)")
    gc.add_argument("--older-than", metavar="AGE", help="evict entries not used for this long (7d, 12h, 1d12h)")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    gc.add_argument("--cache-dir", metavar="DIR", help="the cache root (default $KUBETUNE_CACHE or ~/.cache/kubetune)")
    parser.set_defaults(func=run)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m kubetune.trainer.cli.storage storage ls s3://...`."""
    parser = argparse.ArgumentParser(prog="kubetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


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


if __name__ == "__main__":
    sys.exit(main())


def register(subparsers: Any) -> None:
    """The main CLI's command table calls this (see `kubetune.trainer.cli.main.COMMAND_MODULES`)."""
    add_parser(subparsers)
