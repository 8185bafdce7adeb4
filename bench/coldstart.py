"""Cold start of an InferenceService pod: time-to-ready and download throughput, cold vs warm cache.

    python bench/coldstart.py                 # a ~300 MB Llama (fp32) from moto's S3, CPU, a few minutes
    python bench/coldstart.py --hidden 512    # smaller (~100 MB), faster

Runs exactly what the rendered pod runs, as local processes: the init container
(`python -m kubetune.trainer.serve.fetch --model s3://...`) and then the server container
(`kubetune serve s3://... --engine transformers`) until `/ready` answers 200. First with an
empty node cache (cold: everything is downloaded), then again with the same cache (warm: a
second replica on the node, or a restarted pod). S3 is moto's server on 127.0.0.1, so the
download throughput measures the storage layer (parallel ranged GETs, SHA-256 verification,
atomic renames) rather than a network. Prints a table; writes bench/results/coldstart.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(directory: Path, hidden: int, layers: int) -> int:
    from kubetune.trainer.train.models.builtin import build_tiny_llama

    if not (directory / "config.json").is_file():
        build_tiny_llama(directory, vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512)
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ready_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def one_start(uri: str, cache: Path, env: dict[str, str]) -> dict:
    """Init container, then server container until ready; seconds for each."""
    from kubetune.operator.serving.render import render_inference

    port = free_port()
    cr = {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
          "metadata": {"name": "bench", "namespace": "bench", "uid": "u"},
          "spec": {"model": {"uri": uri}, "engine": "transformers", "gpus": 0, "port": port}}
    pod = render_inference(cr)[0]["spec"]["template"]["spec"]
    (fetch,), (server,) = pod["initContainers"], pod["containers"]
    env = {**env, "KUBETUNE_CACHE": str(cache)}
    local = {"python": sys.executable, "kubetune": str(BIN / "kubetune")}

    started = time.perf_counter()
    init = subprocess.run([local[fetch["command"][0]], *fetch["command"][1:], *fetch["args"]], env=env,
                          capture_output=True, text=True, check=False)
    fetch_s = time.perf_counter() - started
    if init.returncode != 0:
        raise SystemExit(f"fetch failed:\n{init.stderr}")
    summary = json.loads(init.stdout.strip().splitlines()[-1])
    server_started = time.perf_counter()
    proc = subprocess.Popen([local[server["command"][0]], *server["command"][1:], *server["args"]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while ready_status(f"http://127.0.0.1:{port}") != 200:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            time.sleep(0.1)
        load_s = time.perf_counter() - server_started
    finally:
        proc.terminate()
        proc.wait(60)
    return {"fetch_s": round(fetch_s, 2), "fetch_inner_s": summary["seconds"], "load_s": round(load_s, 2),
            "ready_s": round(fetch_s + load_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the generated model (1024: ~300 MB)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--runs", type=int, default=1, help="cold/warm pairs")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="kubetune-coldstart-"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "KUBETUNE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "HOME": str(work / "home"), "XDG_CACHE_HOME": str(work / "xdg")}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env["AWS_ENDPOINT_URL_S3"] = endpoint
        model_dir = work / "model"
        size = build_model(model_dir, args.hidden, args.layers)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="models")
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            client.upload_file(str(path), "models", f"bench/{path.relative_to(model_dir).as_posix()}")
        uri = "s3://models/bench"
        rows = []
        for run in range(args.runs):
            cache = work / f"cache-{run}"
            for label in ("cold", "warm"):
                result = one_start(uri, cache, env)
                throughput = size / 1e6 / result["fetch_inner_s"] if label == "cold" and result["fetch_inner_s"] > 0 else None
                rows.append({"run": run + 1, "cache": label, "model_MB": round(size / 1e6, 1), **result,
                             "download_MBps": round(throughput, 1) if throughput else None})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    header = "| run | cache | model MB | fetch s | download MB/s | server load s | time to ready s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['download_MBps']}" if r["download_MBps"] else "- (cached)"
        lines.append(f"| {r['run']} | {r['cache']} | {r['model_MB']} | {r['fetch_s']} | {rate} | {r['load_s']} | {r['ready_s']} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        meta = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
                "hidden": args.hidden, "layers": args.layers}
        (RESULTS / "coldstart.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / "coldstart.md").write_text(
            "# Cold start of an InferenceService pod (moto S3 on 127.0.0.1, CPU)\n\n"
            f"{json.dumps(meta)}\n\n{table}\n\n"
            "fetch: the init container (download into the node cache, or find it there); server load: "
            "`kubetune serve` until /ready; time to ready: both.\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
