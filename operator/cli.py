"""`kubetune crds` and `kubetune operator`: the operator's subcommands, registered into the main
CLI by its command table (`kubetune.trainer.cli.main.COMMAND_MODULES`). kopf is imported only when the operator runs, so
`kubetune train` never loads it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    crds = subparsers.add_parser(
        "crds",
        help="write the CustomResourceDefinitions (generated from the spec models)",
        description="Write the CRDs of FineTuneJob, AlignmentJob and InferenceService. Without --out, print them as one "
        "multi-document YAML stream (for `kubetune crds | kubectl apply -f -`).",
    )
    crds.add_argument("--out", metavar="DIR", help="write one file per CRD into DIR (e.g. crds/)")
    crds.add_argument("--check", action="store_true", help="with --out: exit 1 if the files there are stale")
    crds.set_defaults(func=cmd_crds)

    render = subparsers.add_parser(
        "render",
        help="print the Kubernetes objects the operator would create for a manifest (no cluster needed)",
        description="Run the operator's own admission check and first reconcile on a FineTuneJob, AlignmentJob or "
        "InferenceService manifest and print the objects it would create, as YAML: for reviews, GitOps diffs and "
        "policy checks before applying. Referenced jobs' outputs show as kubetune-ref://KIND/NAME.",
    )
    render.add_argument("file", help="the manifest (YAML)")
    render.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of spec.training (jobs) or spec (InferenceService); repeatable")
    render.add_argument("-n", "--namespace", default=None, help="namespace (default: the manifest's, else default)")
    _add_platform_flags(render)
    render.set_defaults(func=cmd_render)

    op = subparsers.add_parser(
        "operator",
        help="run the kubetune operator (kopf) against the current cluster",
        description="Reconcile FineTuneJobs and AlignmentJobs into training pods and InferenceServices into "
        "autoscaled servers. Uses the in-cluster "
        "service account, else $KUBECONFIG.",
    )
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs like team-* work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (the default)")
    peering = op.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true",
                         help="no peering: only for a single replica (never run two like this)")
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="kopf peering object shared by the replicas, so only one acts (default: kopf's)")
    op.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    op.add_argument("--liveness", metavar="URL", default=None,
                    help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--trainer-image", default=None, help="default image of the training pods")
    op.add_argument("--metrics-port", type=int, default=None, help="serve the operator's Prometheus metrics on this port")
    op.add_argument("--server-image", default=None,
                    help="image of InferenceService pods without spec.image, for every engine (default: the engine's "
                    "own: --vllm-image for vllm, --trainer-image for transformers)")
    op.add_argument("--vllm-image", default=None,
                    help="image of `engine: vllm` InferenceService pods (default ghcr.io/kubetune/kubetune-vllm:<version>)")
    op.add_argument("--host-cache-root", default=None, type=_host_cache_root, metavar="DIR",
                    help="node directory under which hostPath model caches live, as DIR/<namespace>/<cache.subPath> "
                    "(default /var/lib/kubetune/cache); resources cannot name another node path")
    op.add_argument("--default-s3-endpoint", default=None, metavar="URL",
                    help="S3-compatible endpoint of job and serving pods whose spec.storage sets none "
                    "(the resource's own endpoint wins)")
    op.add_argument("--default-s3-secret", default=None, metavar="NAME",
                    help="Secret (in each resource's namespace, keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) for pods "
                    "whose spec.storage has no secretRef and that name no serviceAccountName; passed as secretKeyRef")
    op.add_argument("--gpu-memory-gib", type=float, default=None, metavar="GIB",
                    help="GPU memory for jobs and services without spec.gpuMemoryGiB; those that cannot fit are refused")
    for flag, metavar, text in (
        ("--prometheus-address", "URL", "Prometheus that KEDA queries for InferenceServices with minReplicas 0 "
         "(default http://prometheus-operated.monitoring.svc:9090)"),
        ("--platform-defaults", "FILE", "YAML/JSON of the platform's pod defaults (podTemplate, nodeSelector, "
         "tolerations) under every resource's own (Helm platformDefaults)"),
    ):
        op.add_argument(flag, default=None, metavar=metavar, help=text)
    op.add_argument("--reconcile-interval", type=float, default=None, metavar="SECONDS",
                    help="how often a running job's Job and status.json are observed (default 10)")
    op.add_argument("--webhook-port", type=int, default=None, help="serve the validating admission webhook on this port")
    op.add_argument("--webhook-host", default=None, help="the webhook's hostname as the API server reaches it")
    op.add_argument("--webhook-cert", default=None, help="TLS certificate file of the webhook server")
    op.add_argument("--webhook-key", default=None, help="TLS private key file of the webhook server")
    op.add_argument("--webhook-managed", default=None, metavar="NAME",
                    help="let the operator create/update the ValidatingWebhookConfiguration NAME")
    op.add_argument("-v", "--verbose", action="store_true")
    op.add_argument("--debug", action="store_true")
    op.set_defaults(func=cmd_operator)


def _add_platform_flags(parser: argparse.ArgumentParser) -> None:
    """The operator's flags that shape the objects (what the chart's values set)."""
    parser.add_argument("--trainer-image", default=None, help="the operator's --trainer-image")
    parser.add_argument("--server-image", default=None, help="the operator's --server-image")
    parser.add_argument("--vllm-image", default=None, help="the operator's --vllm-image")
    parser.add_argument("--host-cache-root", default=None, type=_host_cache_root, metavar="DIR",
                        help="the operator's --host-cache-root")
    parser.add_argument("--default-s3-endpoint", default=None, metavar="URL", help="the operator's --default-s3-endpoint")
    parser.add_argument("--default-s3-secret", default=None, metavar="NAME", help="the operator's --default-s3-secret")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, metavar="GIB", help="the operator's --gpu-memory-gib")
    parser.add_argument("--prometheus-address", default=None, metavar="URL", help="the operator's --prometheus-address")
    parser.add_argument("--platform-defaults", default=None, metavar="FILE", help="the operator's --platform-defaults")
    parser.add_argument("--values", default=None, metavar="FILE",
                        help="a Helm values file of the kubetune chart: the flags and platformDefaults it passes to the operator "
                        "(flags given here win)")


def cmd_render(args: argparse.Namespace) -> int:
    import copy

    import yaml

    from kubetune.operator.config import platform_config, with_chart_values
    from kubetune.operator.preview import render_manifest
    from kubetune.trainer.api.specfile import JOB_KINDS, apply_overrides
    from kubetune.trainer.artifacts.documents import read_yaml

    document = read_yaml(args.file)
    if not isinstance(document, dict):
        from kubetune.trainer.api.errors import SpecError

        raise SpecError(str(args.file), "is not a manifest (a YAML mapping).", "pass a kubetune resource manifest.")
    document = copy.deepcopy(document)
    spec = document.get("spec")
    target = spec.get("training") if isinstance(spec, dict) and document.get("kind") in JOB_KINDS else spec
    if args.overrides and isinstance(target, dict):
        apply_overrides(target, args.overrides)
    config = platform_config(with_chart_values(args))
    objects = render_manifest(document, config, namespace=args.namespace, source=str(args.file))
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _host_cache_root(value: str) -> str:
    from kubetune.operator.validation import check_host_cache_root

    try:
        return check_host_cache_root(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetune.operator.crdgen import crd_files

    files = crd_files()
    if not args.out:
        if args.check:
            print("--check needs --out DIR", file=sys.stderr)
            return 2
        sys.stdout.write("---\n".join(files.values()))
        return 0
    out = Path(args.out)
    if args.check:
        stale = [name for name, text in files.items() if not (out / name).is_file() or (out / name).read_text() != text]
        for name in stale:
            print(f"stale: {out / name} (run `kubetune crds --out {out}`)", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(out / name)
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune.operator.config import config_from_args
    from kubetune.operator.main import run

    run(config_from_args(args), args)
    return 0
