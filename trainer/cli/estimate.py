"""`kubetune estimate`: the per-GPU memory estimate of a training spec or FineTuneJob manifest
(the arithmetic is `kubetune.trainer.api.estimate`; the model's shape comes from
`kubetune.trainer.artifacts.model_shape`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.estimate import GIB, _human, _zero_text, estimate, fit_message
from kubetune.trainer.api.specfile import apply_overrides, extract_training, validate_training
from kubetune.trainer.artifacts.documents import read_yaml


def register(subparsers: Any) -> None:
    """The `estimate` subcommand."""
    p = subparsers.add_parser(
        "estimate",
        help="estimate per-GPU memory of a training spec or FineTuneJob (weights, gradients, optimizer, activations)",
        description="Estimate the peak memory per GPU of a training spec or a FineTuneJob/AlignmentJob manifest, "
        "by component, and whether it fits on GPUs of --gpu-memory GiB. Nodes and GPUs per node come from "
        "the manifest unless given.",
    )
    p.add_argument("file", help="a training spec YAML, or a FineTuneJob/AlignmentJob manifest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training spec field, e.g. --set method=qlora (repeatable)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: the manifest's spec.nodes, else 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: the manifest's spec.gpusPerNode, else 1; 0 estimates a CPU process)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory of one GPU in GiB, e.g. 80 (default: the manifest's spec.gpuMemoryGiB)")
    p.add_argument("--params", default=None, metavar="N",
                   help="parameter count, e.g. 7B, when model.path has no local config.json (S3, hub)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    from kubetune.trainer.artifacts.model_shape import resolve_shape  # boto3 behind it: not for --help

    document = read_yaml(args.file)
    training, kind, prefix = extract_training(document, str(args.file))
    training = apply_overrides(training, args.overrides)
    spec = validate_training(training, str(args.file), prefix)
    cluster = (document.get("spec") or {}) if kind else {}
    nodes = args.nodes if args.nodes is not None else int(cluster.get("nodes") or 1)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else int(cluster.get("gpusPerNode", 1))
    gpu_gib = args.gpu_memory if args.gpu_memory is not None else cluster.get("gpuMemoryGiB")
    params = args.params if args.params is not None else cluster.get("modelParameters")
    try:
        shape = resolve_shape(spec.model.path, params)
    except ValueError as exc:
        raise SpecError("--params", str(exc)) from None
    if shape is None:
        raise SpecError(
            f"{prefix + '.' if prefix else ''}model.path",
            f"the size of {spec.model.path!r} is unknown (no local config.json, not a known architecture).",
            "pass --params (e.g. --params 7B), or point model.path at a local model directory.",
        )
    est = estimate(spec, nodes=nodes, gpus_per_node=gpus, shape=shape)
    if args.json:
        print(json.dumps({
            "model": shape.name, "parameters": est.parameters, "activeParameters": shape.active_parameters,
            "experts": shape.experts, "activeExperts": shape.active_experts, "trainable": est.trainable,
            "nodes": nodes, "gpusPerNode": gpus, "precision": est.precision,
            "componentsGiB": {k: round(v / GIB, 3) for k, v in est.components.items()},
            "totalGiB": round(est.total_gib, 3), "cpuOffloadGiB": round(est.cpu_offload_bytes / GIB, 3),
            "gpuMemoryGiB": gpu_gib, "fits": None if gpu_gib is None else est.fits(float(gpu_gib)),
        }, indent=2))
        return 0 if gpu_gib is None or est.fits(float(gpu_gib)) else 1
    unit = "GPU" if gpus > 0 else "process (CPU)"
    print(f"model      {shape.name}: {_human(est.parameters)} parameters, {_human(est.trainable)} trainable "
          f"({spec.method}, {est.precision}{_zero_text(spec)})")
    if shape.experts > 1:
        print(f"experts    {shape.experts} per layer, {shape.active_experts} per token: {_human(shape.active_parameters)} "
              f"of {_human(est.parameters)} parameters active per token (every expert is held in memory)")
    print(f"layout     {nodes} node(s) x {gpus} GPU(s); {spec.train.batchSize} x {spec.data.maxLength} tokens per step per GPU"
          + (", gradient checkpointing" if spec.train.gradientCheckpointing else ""))
    print()
    print(f"{'component':<14}{'GiB':>10}")
    for name, value in est.components.items():
        print(f"{name:<14}{value / GIB:>10.2f}" + ("  (gradients and activations do not peak together)" if name == "overlap" else ""))
    print(f"{'total per ' + ('GPU' if gpus > 0 else 'process'):<14}{est.total_gib:>10.2f}")
    if est.cpu_offload_bytes:
        print(f"{'(CPU offload)':<14}{est.cpu_offload_bytes / GIB:>10.2f}")
    for note in est.notes:
        print(f"note: {note}")
    if gpu_gib is None:
        return 0
    gpu_gib = float(gpu_gib)
    if est.fits(gpu_gib):
        print(f"\nfits: yes ({est.total_gib:.1f} of {gpu_gib:g} GiB per {unit})")
        return 0
    print(f"\nfits: NO: {fit_message(spec, nodes=nodes, gpus_per_node=gpus, gpu_gib=gpu_gib, shape=shape, est=est)}")
    return 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="kubetune")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
