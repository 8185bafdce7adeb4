"""`kubetune generate`, `kubetune chat` and `kubetune serve`.

`register(subparsers)` adds the three commands to kubetune's parser (entry point or a direct call
from `kubetune.trainer.cli.main`); `python -m kubetune.trainer.cli.infer ...` runs them standalone.
Heavy modules load inside the commands, so `kubetune --help` stays fast. User errors are
`KubetuneError`s: one paragraph on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from kubetune.trainer.serve.protocol import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger("kubetune")


# ---------------------------------------------------------------------------------------------
# shared arguments


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("model", help="model directory, s3:// prefix, hub id, builtin:tiny-llama, or a LoRA training output")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter (output dir or s3:// prefix) served as model NAME on the same base (repeatable)")
    g.add_argument("--base", help="base model of a LoRA output (default: the one in its kubetune-spec.yaml)")
    g.add_argument("--served-model-name", help="name of the base model in requests and /v1/models (default: its directory name)")
    g.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"],
                   help="auto: vllm when installed on a GPU machine, else transformers")
    g.add_argument("--template", help="override the chat template: a built-in name (kubetune templates) or a Jinja string")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="speculative decoding without a draft: propose N tokens by n-gram lookup in the prompt")
    add_engine_arguments(g, "model")
    s3 = parser.add_argument_group("S3 endpoint for s3:// locations (default: AWS, or AWS_ENDPOINT_URL_S3)")
    s3.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    s3.add_argument("--region", help="bucket region (default: AWS_REGION / shared config)")
    s3.add_argument("--path-style", action="store_true", help="address buckets as endpoint/bucket")


def add_engine_arguments(group: argparse._ActionsContainer, name: str) -> None:
    """The engine settings' flags of one argument group, from the engines' flag table."""
    from kubetune.trainer.api.engine_flags import cli_flags

    for flag in cli_flags(name):
        kwargs: dict[str, Any] = {"default": flag.flag_default, "help": flag.help}
        if flag.repeated:
            kwargs["action"] = "append"
        elif flag.choices:
            kwargs["choices"] = list(flag.choices)
        else:
            kwargs["type"] = _value_type(flag.type)
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        group.add_argument(flag.cli, **kwargs)


def _value_type(annotation: Any) -> type:
    """`int | None` -> int: what argparse converts a flag's value with."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def storage_from_args(args: argparse.Namespace):
    """Where `s3://` models, adapters, datasets and outputs are reached (credentials: the AWS way)."""
    from kubetune.trainer.api.spec import StorageSpec

    return StorageSpec(endpointUrl=args.endpoint_url, region=args.region, pathStyle=args.path_style)


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, max_tokens: int) -> None:
    """`max_tokens` is the default cap, lowered to what the model's context has room for (a demo
    model has 256 tokens in all): the defaults work on every model, an explicit value is checked."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"new tokens at most (default: {max_tokens}, or fewer to fit the model's context)")
    parser.set_defaults(default_max_tokens=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default: {temperature})")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int)


def sampling_from_args(args: argparse.Namespace):
    from kubetune.trainer.serve.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          stop=list(args.stop), seed=args.seed).validate()


def adapters_from_args(args: argparse.Namespace) -> list:
    from kubetune.trainer.artifacts.adapters import parse_adapter_arg

    return [parse_adapter_arg(value) for value in args.adapter]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from kubetune.trainer.api.errors import SpecError

    if args.draft_model and args.prompt_lookup:
        raise SpecError("--draft-model", "a draft model and prompt lookup cannot be combined.", "pick one of them.")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise SpecError("--prompt-lookup", "must be at least 1.")
    return {"engine": args.engine, "adapters": adapters_from_args(args), "base": args.base,
            "served_name": args.served_model_name, "dtype": args.dtype, "max_model_len": args.max_model_len,
            "trust_remote_code": args.trust_remote_code, "draft": args.draft_model, "prompt_lookup": args.prompt_lookup,
            "num_assistant_tokens": args.num_assistant_tokens, "storage": storage_from_args(args),
            **({"device": args.device} if args.engine != "vllm" else {"kv_cache_memory": args.kv_cache_memory})}


def load_engine(args: argparse.Namespace):
    from kubetune.trainer.serve.engines import create_engine

    kwargs = engine_kwargs(args)
    if args.engine == "vllm":
        _hint_cpu_memory(args)
    engine = create_engine(args.model, **kwargs)
    if args.template:
        engine.set_template(args.template)
    return engine


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# commands


def cmd_generate(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.uri import is_s3
    from kubetune.trainer.serve.batch import generate_file
    from kubetune.trainer.serve.output import s3_target

    _quiet_libraries()
    params = sampling_from_args(args)
    out = str(s3_target(args.out)) if is_s3(args.out) else args.out  # a malformed URI fails before loading
    engine = load_engine(args)
    model = args.model_name or engine.default_model  # a LoRA output directory generates with its adapter
    engine.adapter_for(model)
    count = generate_file(engine, args.data, out, params, format=args.format, model=model,
                          batch_size=args.batch_size, max_samples=args.max_samples, storage=storage_from_args(args),
                          progress=not args.quiet)
    print(f"Wrote {count} generations by {model} to {out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kubetune.trainer.serve.params import Sequence

    _quiet_libraries()
    params = sampling_from_args(args)
    engine = load_engine(args)
    model = args.model_name or engine.default_model  # a LoRA output directory chats with its adapter
    adapter = engine.adapter_for(model)
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"Chatting with {model} ({engine.name}). /reset clears the history, "
              "/exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = engine.encode_chat(history, model)
        # Keep the conversation within the context: forget the oldest turns first.
        first = 1 if history[0]["role"] == "system" else 0
        answer_room = params.max_tokens or min(params.default_max_tokens or 1, engine.context_length // 2)
        while len(history) - first > 1 and len(ids) + answer_room > engine.context_length:
            del history[first]
            ids = engine.encode_chat(history, model)

        def show(event) -> None:
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()

        seq = Sequence(prompt_ids=ids, params=params, adapter=adapter, lstrip=True, emit=show)
        engine.check_length(len(ids), params)
        engine.run([seq])
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": seq.text})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kubetune.trainer.serve.engine import pick_engine

    if pick_engine(args.engine) == "vllm":
        return _exec_vllm(args)
    from kubetune.trainer.serve.server import ServerConfig, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    config = ServerConfig(max_batch_size=args.max_batch_size or ServerConfig.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000.0,
                          max_queue=args.max_queue, api_key=api_key or None, drain_timeout_s=args.drain_timeout,
                          drain_delay_s=args.drain_delay, max_request_bytes=args.max_request_bytes,
                          adapter_roots=list(args.adapter_root), max_adapters=args.max_adapters,
                          max_images=args.max_images or ServerConfig.max_images)
    kwargs = {**engine_kwargs(args), "engine": "transformers"}
    return serve(args.model, host=args.host, port=args.port, config=config, log_level=args.log_level,
                 template=args.template, **kwargs)


def _exec_vllm(args: argparse.Namespace) -> int:
    from kubetune.trainer.api.engine_flags import vllm_flag_values
    from kubetune.trainer.serve.vllm_engine import server_command

    argv = server_command(args.model, host=args.host, port=args.port, adapters=adapters_from_args(args), base=args.base,
                          served_name=args.served_model_name, api_key_env=args.api_key_env, draft=args.draft_model,
                          prompt_lookup=args.prompt_lookup, num_speculative_tokens=args.num_assistant_tokens or 4,
                          template=args.template, trust_remote_code=args.trust_remote_code, extra_args=args.vllm_arg,
                          storage=storage_from_args(args), **vllm_flag_values(vars(args)))
    _hint_cpu_memory(args)
    print("exec: " + shlex.join(argv), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.execv(argv[0], argv)  # replaces this process: signals (SIGTERM drain) go straight to vLLM
    return 0  # pragma: no cover


def _hint_cpu_memory(args: argparse.Namespace) -> None:
    """vLLM's CPU build reserves 92% of the machine's memory by default (not the pod's limit)."""
    if args.kv_cache_memory or getattr(args, "gpu_memory_utilization", None) or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    if any(a.startswith(("--kv-cache-memory", "--gpu-memory-utilization")) for a in getattr(args, "vllm_arg", [])):
        return
    import torch

    if not torch.cuda.is_available():
        print("kubetune: on CPU, vLLM reserves --gpu-memory-utilization (0.92) of the node's memory for itself; "
              "pass --kv-cache-memory 1G (or set VLLM_CPU_KVCACHE_SPACE=1, in GiB) if it fails to start", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# registration


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate outputs for every prompt of a dataset into a JSONL file")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="dataset file, directory or s3:// prefix (text, alpaca, sharegpt, lmflow)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "alpaca", "sharegpt", "lmflow"])
    p.add_argument("--out", required=True, help="output JSONL file or s3:// URI (a prefix ending in / gets generations.jsonl)")
    p.add_argument("--model-name", help="which loaded model generates (an adapter name; default: the adapter of a LoRA "
                                        "output, else the base)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(p, temperature=0.0, max_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn; reads stdin)")
    add_model_arguments(p)
    p.add_argument("--model-name", help="which loaded model answers (an adapter name; default: the adapter of a LoRA "
                                        "output, else the base)")
    p.add_argument("--system", help="system prompt")
    add_sampling_arguments(p, temperature=0.7, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("serve", help="serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API")
    add_model_arguments(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    add_engine_arguments(p, "serve")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill once a request arrives")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before requests get 503")
    p.add_argument("--api-key-env", default="KUBETUNE_API_KEY",
                   help="environment variable holding the API key; when it is set, /v1 requires 'Authorization: Bearer KEY'")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--drain-delay", type=float, default=0.0,
                   help="seconds to keep accepting requests after SIGTERM while /ready answers 503 (for load balancers "
                        "without a preStop delay)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lim = p.add_argument_group("limits and adapter access (transformers engine)")
    lim.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                     help=f"larger request bodies get a 413 before they are read (default: {DEFAULT_MAX_REQUEST_BYTES})")
    lim.add_argument("--adapter-root", action="append", default=[], metavar="DIR|s3://PREFIX",
                     help="where /v1/load_lora_adapter may load adapters from besides the model cache: a local "
                          "directory or an s3:// prefix (repeatable; without one, only the cache)")
    lim.add_argument("--max-adapters", type=int, default=DEFAULT_MAX_ADAPTERS, metavar="N",
                     help=f"adapters served at once; /v1/load_lora_adapter beyond it gets a 409 (default: {DEFAULT_MAX_ADAPTERS})")
    v = p.add_argument_group("vllm engine")
    add_engine_arguments(v, "vllm")
    v.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    p.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """`kubetune ...` itself: these commands are registered there through the plugin group."""
    from kubetune.trainer.cli.main import main as kubetune_main

    return kubetune_main(argv)


if __name__ == "__main__":
    sys.exit(main())
