"""`kubetune prepare SPEC`: tokenize a spec's datasets once, into the tokenized-dataset cache."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from kubetune.trainer.api.errors import SpecError, SpecErrors


def register(subparsers: Any) -> None:
    """The `prepare` subcommand."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a spec's datasets once into data.cache (what a FineTuneJob's prepare pod runs)",
        description="Run the data pipeline of a training spec or FineTuneJob/AlignmentJob manifest and store the "
        "token rows in data.cache, keyed by the data's content, tokenizer, template and length settings. A "
        "training run with the same key reads them instead of tokenizing. A second run finds the entry and "
        "does nothing.",
    )
    p.add_argument("file", help="a training spec YAML, or a FineTuneJob/AlignmentJob manifest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set data.maxLength=2048 (repeatable)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from kubetune.trainer.cli.specfiles import load_spec
    from kubetune.trainer.train.preflight import preflight

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_spec(args.file, args.overrides)
    preflight(loaded.spec, loaded.field_prefix, loaded.source)
    try:
        from kubetune.trainer.train.prepare import prepare

        result = prepare(loaded.spec)
    except SpecError as err:
        raise SpecErrors([err.prefixed(loaded.field_prefix)], loaded.source) from None
    if result.location is None:
        print(f"Nothing cached: {result.note}.", file=sys.stderr)
    elif result.hit:
        print(f"Already prepared: {result.location}")
    else:
        train = result.stats.get("train") or {}
        rows = train.get("packedRows", train.get("examples"))
        print(f"Prepared {rows} training rows: {result.location}")
    return 0
