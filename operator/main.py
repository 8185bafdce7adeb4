"""`kubetune operator`: build the registry for a configuration and run kopf with it."""

from __future__ import annotations

import argparse

from kubetune.operator.config import Locks, OperatorConfig


def run(config: OperatorConfig, args: argparse.Namespace) -> None:
    """Run kopf with this configuration until it is stopped (SIGTERM/SIGINT)."""
    import kopf

    from kubetune.operator.handlers import register

    kopf.configure(verbose=args.verbose, debug=args.debug)
    namespaces = list(args.namespace)
    kopf.run(
        registry=register(kopf.OperatorRegistry(), config),
        memo=kopf.Memo(config=config, locks=Locks(), kube=None),
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
