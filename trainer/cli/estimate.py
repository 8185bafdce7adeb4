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
from kubetune.trainer.api.serve_estimate import (
    ServingEstimate,
    extra_args_settings,
    held_parameters,
    serving_estimate,
    serving_fit_message,
)
from kubetune.trainer.api.specfile import apply_overrides, extract_training, validate_training
from kubetune.trainer.artifacts.documents import read_yaml


def register(subparsers: Any) -> None:
    """The `estimate` subcommand."""
    p = subparsers.add_parser(
        "estimate",
        help="estimate per-GPU memory of a training spec, FineTuneJob or InferenceService (weights, gradients, "
        "optimizer, activations; KV cache for a service)",
        description="Estimate the peak memory per GPU of a training spec or a FineTuneJob/AlignmentJob manifest, "
        "by component, and whether it fits on GPUs of --gpu-memory GiB. Nodes and GPUs per node come from "
        "the manifest unless given. For an InferenceService manifest: one replica's weights, activation peak "
        "and the KV cache left (in tokens), and whether vLLM can start with its maxModelLen.",
    )
    p.add_argument("file", help="a training spec YAML, a FineTuneJob/AlignmentJob manifest, or an InferenceService "
                   "manifest (the memory of one server replica: weights, activations, KV cache)")
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
    if isinstance(document, dict) and document.get("kind") == "InferenceService":
        return estimate_service(document, args)
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


def _service_settings(document: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What the serving estimate needs from an InferenceService manifest (the operator's
    defaults where a field is unset); the operator's schema checks the rest at apply."""
    spec = document.get("spec") or {}
    engine_args = spec.get("engineArgs") or {}
    engine = spec.get("engine") or "vllm"
    gpus = _number(spec.get("gpus", 1), "spec.gpus", int)
    gpu_gib = args.gpu_memory if args.gpu_memory is not None else spec.get("gpuMemoryGiB")
    if gpu_gib is None:
        raise SpecError("spec.gpuMemoryGiB", "is not set, so there is nothing to fit the model in.",
                        "set it in the manifest (e.g. 80 for an H100 80GB), or pass --gpu-memory 80.")
    tp = spec.get("tensorParallelSize") or max(1, gpus)
    return {"engine": engine, "gpus": gpus, "gpu_gib": _number(gpu_gib, "spec.gpuMemoryGiB", float),
            "tp": _number(tp, "spec.tensorParallelSize", int) if engine == "vllm" else 1,
            "location": (spec.get("model") or {}).get("uri") or "",
            "params": args.params if args.params is not None else spec.get("modelParameters"),
            "dtype": engine_args.get("dtype") or "auto", "quantization": engine_args.get("quantization"),
            "max_model_len": engine_args.get("maxModelLen"),
            "utilization": engine_args.get("gpuMemoryUtilization") if engine == "vllm" else 1.0,
            "extra": extra_args_settings(engine_args.get("extraArgs")) if engine == "vllm" else {}}


def _number(value: Any, field: str, kind: type) -> Any:
    """A manifest's number, or a SpecError naming its field (the manifest is not validated here)."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SpecError(field, f"{value!r} is not a number.", f"give {field} as a number.") from None


def estimate_service(document: dict[str, Any], args: argparse.Namespace) -> int:
    """`kubetune estimate isvc.yaml`: one replica's memory per GPU, and whether it can start."""
    from kubetune.trainer.artifacts.model_shape import resolve_shape

    s = _service_settings(document, args)
    if not s["location"] and s["params"] is None:
        raise SpecError("spec.model", "comes from a training job (fromJob): its size is not known here.",
                        "pass --params (e.g. --params 8B), or set spec.modelParameters.")
    try:
        shape = resolve_shape(s["location"], s["params"])
    except ValueError as exc:
        raise SpecError("--params", str(exc)) from None
    if shape is None:
        raise SpecError("spec.model.uri", f"the size of {s['location']!r} is unknown (no local config.json, not a "
                        "known architecture).", "pass --params (e.g. --params 8B), or set spec.modelParameters.")
    est = serving_estimate(shape, gpu_gib=s["gpu_gib"], tensor_parallel=s["tp"], dtype=s["dtype"],
                           quantization=s["quantization"], max_model_len=s["max_model_len"], utilization=s["utilization"],
                           **s["extra"])
    if est is None:
        raise SpecError("spec.engineArgs.quantization", f"{s['quantization']!r}: the width of its weights is not "
                        "known here.", "estimate with one of awq, gptq, fp8, bitsandbytes, int8, or leave it unset.")
    fits = est.fits
    if args.json:
        print(json.dumps(_service_json(est, s), indent=2))
        return 0 if fits else 1
    _print_service(est, s)
    if fits:
        print(f"\nfits: yes ({est.kv_tokens:,} tokens of KV cache per replica)")
        return 0
    message = serving_fit_message(est, gpus=s["gpus"], parallel=s["engine"] == "vllm")
    print(f"\nfits: NO: {message}")
    return 1


def _service_json(est: ServingEstimate, s: dict[str, Any]) -> dict[str, Any]:
    shape = est.shape
    return {"model": shape.name, "parameters": held_parameters(shape),
            "activeParameters": shape.active_parameters, "engine": s["engine"], "tensorParallelSize": est.tensor_parallel,
            "componentsGiB": {k: round(v / GIB, 3) for k, v in est.components.items()},
            "usableGiB": round(est.budget / GIB, 3), "kvCacheGiB": round(max(0.0, est.kv_space) / GIB, 3),
            "kvBytesPerToken": est.kv_bytes_per_token, "kvTokens": est.kv_tokens, "maxModelLen": est.max_model_len,
            "gpuMemoryGiB": s["gpu_gib"], "fits": est.fits, "notes": est.notes}


def _print_service(est: ServingEstimate, s: dict[str, Any]) -> None:
    shape = est.shape
    print(f"model      {shape.name}: {_human(held_parameters(shape))} parameters, engine {s['engine']}, "
          f"tensorParallelSize {est.tensor_parallel}" + (f", {s['quantization']}" if s["quantization"] else ""))
    length = f"maxModelLen {est.max_model_len:,} tokens" if est.max_model_len else "context length unknown"
    print(f"context    {length}; KV cache {est.kv_bytes_per_token / 1024:,.0f} KiB per token per GPU")
    print()
    print(f"{'component':<14}{'GiB':>10}")
    for name, value in est.components.items():
        print(f"{name:<14}{value / GIB:>10.2f}")
    print(f"{'kv cache':<14}{max(0.0, est.kv_space) / GIB:>10.2f}  ({est.kv_tokens:,} tokens)")
    print(f"{'usable per GPU':<14}{est.budget / GIB:>10.2f}  ({s['gpu_gib']:g} GiB x utilization)")
    for note in est.notes:
        print(f"note: {note}")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="kubetune")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
