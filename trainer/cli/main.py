"""`kubetune ...`: a thin shell over library functions.

Subcommands of other parts of kubetune (the operator's `crds`, `operator`, ...) are plugins
registered under the `kubetune.cli` entry-point group, so this module never imports them.
Every user error ends as one paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from kubetune.trainer.api.errors import KubetuneError, SpecError, SpecErrors

log = logging.getLogger("kubetune")


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a training spec YAML, or a FineTuneJob/AlignmentJob manifest "
                        "(`validate`: also an InferenceService)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.maxSteps=10 (repeatable; paths relative to the training spec)",
    )


def _load(args: argparse.Namespace):
    from kubetune.trainer.api.specfile import load_spec
    from kubetune.trainer.train.preflight import preflight

    loaded = load_spec(args.file, args.overrides)
    preflight(loaded.spec, loaded.field_prefix, loaded.source)
    return loaded


def cmd_train(args: argparse.Namespace) -> int:
    from kubetune.trainer.train.distributed import world_info

    loaded = _load(args)
    if args.process_entry:  # before the training libraries load
        from kubetune.trainer.train.backends import backends_needed, hide_unused_backends

        hide_unused_backends(backends_needed(loaded.spec))
    from kubetune.trainer.train.runner import EXIT_INTERRUPTED, run

    try:
        result = run(loaded.spec)
    except SpecError as err:
        raise SpecErrors([err.prefixed(loaded.field_prefix)], loaded.source) from None
    if world_info()[0] != 0:
        return EXIT_INTERRUPTED if result.interrupted else 0  # rank 0 reports for the job
    if result.interrupted:
        print(f"Interrupted at step {result.global_step}; checkpoint saved in {loaded.spec.output_path}. "
              "Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    evals = ", ".join(f"{k}={v:.4g}" for k, v in result.eval_metrics.items() if k in ("eval_loss", "eval_reward", "heldout_exact_match"))
    print(f"Done: {result.global_step} steps in {result.runtime_seconds:.0f}s{resumed}. "
          f"Output: {loaded.spec.output_path}" + (f" ({evals})" if evals else ""))
    return 0


def _admission(document: dict, args: argparse.Namespace) -> list[str]:
    """The operator's admission decision on a manifest, through the very function its webhook
    calls (`kubetune.operator.validation.admit`), so a manifest this accepts is one `kubectl
    apply` accepts. `--set` paths are relative to spec.training (spec for other kinds).
    Returns the webhook's warnings; raises its refusal (exit 2).

    The function is found through the `kubetune.admission` entry point, as the operator's
    subcommands are: the trainer (the data plane) never imports the operator by name."""
    import copy

    from kubetune.trainer.api.specfile import JOB_KINDS, apply_overrides

    plugins = list(entry_points(group="kubetune.admission"))
    try:
        admit = plugins[0].load()
    except (IndexError, ImportError) as exc:  # the operator's part of kubetune is not installed
        raise KubetuneError(f"cannot check a {document.get('kind')} manifest here: the operator's admission "
                            f"checks are unavailable ({exc or 'no kubetune.admission entry point'}). "
                            "Fix: pip install 'kubetune[operator]'.") from None
    document = copy.deepcopy(document)
    spec = document.get("spec")
    target = spec.get("training") if isinstance(spec, dict) and document.get("kind") in JOB_KINDS else spec
    if args.overrides and isinstance(target, dict):
        apply_overrides(target, args.overrides)
    return admit("CREATE", None, document, source=str(args.file))


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.specfile import JOB_KINDS, RESOURCE_KINDS, is_manifest, read_yaml

    document = read_yaml(args.file)
    warnings: list[str] = []
    if is_manifest(document) and document.get("kind") in RESOURCE_KINDS:
        warnings = _admission(document, args)
        for warning in warnings:
            print(f"kubetune: warning: {warning}", file=sys.stderr)
        if document["kind"] not in JOB_KINDS:
            if args.print:
                import yaml

                print(yaml.safe_dump(document.get("spec"), sort_keys=False), end="")
            else:
                print(f"{args.file}: valid {document['kind']} (the checks of the operator's admission webhook).")
            return 0
    loaded = _load(args)
    if args.print:
        import yaml

        print(yaml.safe_dump(loaded.spec.to_document(), sort_keys=False), end="")
    else:
        what = f"{loaded.kind} " if loaded.kind else ""
        spec = loaded.spec
        stages = " -> ".join(step.stage for step in spec.pipeline) if spec.pipeline else spec.stage
        print(f"{loaded.source}: valid {what}training spec ({'pipeline' if spec.pipeline else 'stage'} {stages}, method {spec.method}).")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kubetune.trainer.train.export import export_merged

    out = export_merged(args.adapter, args.out, base=args.base, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"Merged model written to {out}")
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from kubetune.trainer.train.data import describe_templates

    for name, description in describe_templates():
        print(f"{name:10} {description}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.spec import TrainingSpec

    print(json.dumps(TrainingSpec.model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune and serve LLMs locally or on Kubernetes, from one spec.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="run a training spec or FineTuneJob manifest on this machine (or under torchrun)")
    _add_spec_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a spec or manifest without running it")
    _add_spec_arguments(p)
    p.add_argument("--print", action="store_true", help="print the resolved spec with every default filled in")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="merge a LoRA/QLoRA adapter into its base model and save a standalone model")
    p.add_argument("adapter", help="the training output directory (or s3:// prefix) holding the adapter")
    p.add_argument("--out", required=True, help="directory or s3:// prefix for the merged model")
    p.add_argument("--base", help="base model location (default: the one the adapter was trained on)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the merged weights")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 2GB")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("templates", help="list the built-in chat templates")
    p.set_defaults(func=cmd_templates)

    p = sub.add_parser("schema", help="print the training spec's JSON schema")
    p.set_defaults(func=cmd_schema)

    from kubetune.trainer.cli.storage import add_parser as add_storage_parser

    add_storage_parser(sub)

    for ep in entry_points(group="kubetune.cli"):
        try:
            register: Callable[[argparse._SubParsersAction], None] = ep.load()
        except ImportError as exc:  # an optional part that is not installed
            log.debug("kubetune.cli plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The process's own command line (not a caller's argv): optional backends it does not need stay
    # unloaded (`kubetune.trainer.train.backends`); `train` decides once its spec is read.
    args.process_entry = argv is None
    if args.process_entry and args.func is not cmd_train:
        from kubetune.trainer.train.backends import hide_unused_backends

        hide_unused_backends()
    try:
        return int(args.func(args) or 0)
    except KubetuneError as err:
        print(f"kubetune: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
