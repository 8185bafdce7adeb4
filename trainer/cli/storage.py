"""`kubetune storage ls|cp|rm|gc`: the common S3 operations without the AWS CLI in the images,
and garbage collection of the local download cache (`gc`, see `gc.py`).

Either side of `cp` may be local or `s3://`; a prefix or directory is copied recursively (its
contents go below the destination, like `aws s3 cp --recursive`). Same settings and credentials
as the trainer (standard AWS chain; `--endpoint-url` or `AWS_ENDPOINT_URL_S3` for MinIO/Ceph).
Downloads are verified and atomic; uploads are verified against S3's ETag. Bad input exits 2.
"""

from __future__ import annotations

import argparse
from typing import Any


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
    """Execute a parsed `storage` command (boto3 loads here, not for `kubetune --help`)."""
    from kubetune.trainer.cli.storage_ops import run as run_command

    return run_command(args)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m kubetune.trainer.cli.storage storage ls s3://...`."""
    parser = argparse.ArgumentParser(prog="kubetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def register(subparsers: Any) -> None:
    """The main CLI's command table calls this (see `kubetune.trainer.cli.main.COMMAND_MODULES`)."""
    add_parser(subparsers)


if __name__ == "__main__":
    import sys

    sys.exit(main())
