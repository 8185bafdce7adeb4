"""`kubetune console`: the web console (Jobs, Launch, Compare, Playground) for local runs and,
with a kubeconfig or in a pod, the cluster's kubetune resources. FastAPI and uvicorn are imported
only when it runs, so `kubetune --help` stays fast without the `serve` extra."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import KubetuneError, SpecError

TOKEN_ENV = "KUBETUNE_CONSOLE_TOKEN"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "console",
        help="the web console: launch, watch, compare and chat with fine-tuning runs (local or on a cluster)",
        description="Serve the kubetune console. Locally it lists and starts `kubetune train` runs under --runs-dir; "
        "with --kubeconfig or --in-cluster it also lists, shows and applies FineTuneJobs, AlignmentJobs and "
        "InferenceServices with that identity (no privilege beyond it).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--runs-dir", default="outputs/console", metavar="DIR", help="root of local runs (default outputs/console)")
    p.add_argument("--kubeconfig", default=None, metavar="FILE", help="cluster mode with this kubeconfig")
    p.add_argument("--context", default=None, help="the kubeconfig context (default: its current one)")
    p.add_argument("--in-cluster", action="store_true", help="cluster mode with the pod's service account")
    p.add_argument("--namespace", default="default", help="namespace Apply creates resources in (default default)")
    p.add_argument("--token", default=None,
                   help=f"bearer token every request must carry (default ${TOKEN_ENV}); required off loopback")
    p.add_argument("--endpoint", default="http://127.0.0.1:8000", metavar="URL",
                   help="the playground's default OpenAI-compatible endpoint (e.g. a local `kubetune serve`)")
    p.add_argument("--no-local-runs", action="store_true",
                   help="cluster resources only: no local runs listed or started (a console in a pod)")
    p.add_argument("--impersonate-user-header", default=None, metavar="HEADER",
                   help="act in the cluster as the user a trusted auth proxy names in this request header "
                   "(e.g. X-Forwarded-User), through Kubernetes impersonation; a request without it is refused. "
                   "Only behind that proxy: whoever reaches the console directly could name any user")
    p.add_argument("--impersonate-groups-header", default="X-Forwarded-Groups", metavar="HEADER",
                   help="with --impersonate-user-header: the header with the user's groups, comma-separated "
                   "(default X-Forwarded-Groups)")
    p.set_defaults(func=cmd_console)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(args: argparse.Namespace):
    from kubetune.operator.console.app import ConsoleConfig

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _loopback(args.host) and not token:
        raise SpecError("--host", f"{args.host} is reachable from other machines, and there is no token.",
                        f"pass --token (or set ${TOKEN_ENV}), or bind 127.0.0.1.")
    cluster = None
    if args.impersonate_user_header and not (args.kubeconfig or args.in_cluster):
        raise SpecError("--impersonate-user-header", "impersonates users in a cluster, and no cluster is given.",
                        "add --in-cluster or --kubeconfig.")
    if args.kubeconfig or args.in_cluster:
        from kubetune.operator.console.cluster import Cluster

        try:
            cluster = Cluster(args.kubeconfig, args.in_cluster, args.context)
        except Exception as exc:  # a bad kubeconfig: one paragraph, not a traceback
            raise KubetuneError(f"cannot use the cluster ({type(exc).__name__}: {exc}). "
                                "Fix: check --kubeconfig/--context, or run without them for local runs only.") from None
    return ConsoleConfig(runs_dir=Path(args.runs_dir), token=token, cluster=cluster, namespace=args.namespace,
                         endpoint=args.endpoint, local_runs=not args.no_local_runs,
                         user_header=args.impersonate_user_header, groups_header=args.impersonate_groups_header)


def cmd_console(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from kubetune.operator.console.app import create_app
    except ModuleNotFoundError as exc:
        raise KubetuneError(f"`kubetune console` needs {exc.name!r}. Fix: pip install 'kubetune[serve]'.") from None
    app = create_app(config_from_args(args))
    print(f"kubetune console on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
