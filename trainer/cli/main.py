"""`kubetune ...`: a thin shell over library functions, with one explicit command table.

`COMMAND_MODULES` lists every module that adds subcommands, in help order. The trainer's own are
always importable; the operator's (`crds`, `operator`) live in the control plane, which the data
plane never imports by name at module level, so that group is imported here by its module path.
When its third-party dependencies are missing (the `operator` extra), its commands still appear
and say what to install; any other import error is a bug and surfaces with its traceback.
Every user error ends as one paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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
    from kubetune.trainer.cli.specfiles import load_spec
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

    The operator's module is imported by path, as its commands are (see `COMMAND_MODULES`)."""
    import copy

    from kubetune.trainer.api.specfile import JOB_KINDS, apply_overrides

    try:
        admit = importlib.import_module(ADMISSION_MODULE).admit
    except ModuleNotFoundError as exc:
        if _is_kubetune_module(exc.name):
            raise
        raise KubetuneError(f"cannot check a {document.get('kind')} manifest here: the operator's admission "
                            f"checks need {exc.name!r}, which is not installed. "
                            "Fix: pip install 'kubetune[operator]'.") from None
    document = copy.deepcopy(document)
    spec = document.get("spec")
    target = spec.get("training") if isinstance(spec, dict) and document.get("kind") in JOB_KINDS else spec
    if args.overrides and isinstance(target, dict):
        apply_overrides(target, args.overrides)
    return admit("CREATE", None, document, source=str(args.file))


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.specfile import JOB_KINDS, RESOURCE_KINDS, is_manifest
    from kubetune.trainer.artifacts.documents import read_yaml

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
    from kubetune.trainer.train.models.locations import export_merged

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

    if args.reference is None:
        print(json.dumps(TrainingSpec.model_json_schema(), indent=2))
        return 0
    from pathlib import Path

    from kubetune.trainer.api.specdoc import replace_generated

    page = Path(args.reference)
    text = page.read_text()
    new = replace_generated(text)
    if new != text:
        page.write_text(new)
    print(f"{page}: {'updated' if new != text else 'up to date'}")
    return 0


@dataclass(frozen=True)
class CommandGroup:
    """A module whose `register(subparsers)` adds `commands`; `extra` is the pip extra its
    third-party imports come from (None: part of the core install)."""

    module: str
    commands: tuple[str, ...]
    extra: str | None = None


COMMAND_MODULES = (
    CommandGroup("kubetune.trainer.cli.prepare", ("prepare",)),
    CommandGroup("kubetune.trainer.cli.infer", ("generate", "chat", "serve")),
    CommandGroup("kubetune.trainer.cli.eval", ("eval",)),
    CommandGroup("kubetune.trainer.cli.estimate", ("estimate",)),
    CommandGroup("kubetune.trainer.cli.storage", ("storage",)),
    CommandGroup("kubetune.operator.cli", ("crds", "render", "operator"), extra="operator"),
    CommandGroup("kubetune.operator.console.cli", ("console",), extra="serve"),
)
"""Every subcommand beyond train/validate/export/templates/schema, in help order."""
ADMISSION_MODULE = "kubetune.operator.validation"
"""Where `kubetune validate` finds the operator's admission decision (`admit`)."""


def _is_kubetune_module(name: str | None) -> bool:
    return bool(name) and (name == "kubetune" or name.startswith("kubetune."))


def _add_group(sub: argparse._SubParsersAction, group: CommandGroup) -> None:
    """Register a group's commands; a missing optional dependency registers commands that say
    what to install instead of vanishing ("invalid choice") with the cause hidden."""
    try:
        module = importlib.import_module(group.module)
    except ModuleNotFoundError as exc:
        if group.extra is None or _is_kubetune_module(exc.name):
            raise
        missing = exc.name
        for command in group.commands:
            # no option prefix: whatever follows (even --help) reaches the message, not an argparse error
            p = sub.add_parser(command, help=f"(needs: pip install 'kubetune[{group.extra}]')", add_help=False,
                               prefix_chars="\x01")
            p.add_argument("rest", nargs="*")
            p.set_defaults(func=_missing_extra(command, group.extra, missing))
        return
    module.register(sub)


def _missing_extra(command: str, extra: str, missing: str | None):
    def fail(args: argparse.Namespace) -> int:
        raise KubetuneError(f"`kubetune {command}` needs the {missing!r} package, which is not installed. "
                            f"Fix: pip install 'kubetune[{extra}]'.")
    return fail


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
    p.add_argument("--reference", metavar="PAGE", default=None,
                   help="instead, regenerate the spec reference tables in this Markdown page "
                   "(docs/pages/reference/spec.md)")
    p.set_defaults(func=cmd_schema)

    for group in COMMAND_MODULES:
        _add_group(sub, group)
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
