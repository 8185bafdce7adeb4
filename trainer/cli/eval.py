"""`kubetune eval`: perplexity, generation metrics and multiple-choice accuracy of a model.

`register(subparsers)` adds the command to kubetune's parser; heavy modules load inside it.
"""

from __future__ import annotations

import argparse
import sys


def cmd_eval(args: argparse.Namespace) -> int:
    from kubetune.trainer.cli.infer import _quiet_libraries, adapters_from_args
    from kubetune.trainer.eval.run import run_evaluation

    _quiet_libraries()
    tasks = args.task or ["perplexity", "generation"]
    report = run_evaluation(
        args.model, list(args.data), tasks=tasks, format=args.format, served_model=args.model_name,
        adapters=adapters_from_args(args), max_samples=args.max_samples, batch_size=args.batch_size,
        max_new_tokens=args.max_tokens, output_dir=args.out, engine=args.engine, base=args.base,
        dtype=args.dtype, max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
        **({"device": args.device} if args.engine != "vllm" else {}),
    )
    sys.stdout.write(report.to_markdown())
    if args.out:
        print(f"\nResults written to {args.out}/eval_results.json and eval_results.md")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: perplexity, exact match / ROUGE / BLEU, multiple-choice accuracy")
    p.add_argument("model", help="model directory, s3:// prefix, hub id, builtin:tiny-llama, or a LoRA training output")
    p.add_argument("--data", action="append", required=True, help="dataset file, directory or s3:// prefix (repeatable)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "alpaca", "sharegpt", "lmflow"])
    p.add_argument("--task", action="append", choices=["perplexity", "generation", "choice"],
                   help="what to measure (repeatable; default: perplexity and generation)")
    p.add_argument("--out", help="directory for eval_results.json, eval_results.md and eval_predictions.jsonl")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="LoRA adapter to load (repeatable)")
    p.add_argument("--model-name", help="which loaded model to evaluate (an adapter name; default: the adapter of a LoRA output, else the base)")
    p.add_argument("--base", help="base model of a LoRA output (default: the one in its kubetune-spec.yaml)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="vllm speeds up the generation task; perplexity and choice need transformers")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-samples", type=int, help="evaluate on the first N examples of each dataset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per generated answer")
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    from kubetune.trainer.cli.infer import main as infer_main

    return infer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
