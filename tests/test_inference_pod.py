"""The InferenceService pod contract: the rendered init container's, server container's and
`adapters` sidecar's commands, run as local processes against S3 (moto, through a counting proxy),
fetch the model (the quickstart's, trained) and a LoRA adapter trained on top of it (from the
mounted adapters file) into the cache, the sidecar loads the adapter into the running server, and
both names are served through the official `openai` client; a second start downloads nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from kubetune.operator.serving.render import ADAPTERS_MOUNT, render_inference
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(argv: list[str], adapters_dir: Path | None = None) -> list[str]:
    """The container's argv with the image's programs replaced by this environment's (and the
    adapters volume's mount path by its local directory)."""
    head = {"python": sys.executable, "kubetune": str(BIN / "kubetune")}.get(argv[0], argv[0])
    rest = argv[1:] if adapters_dir is None else [a.replace(ADAPTERS_MOUNT, str(adapters_dir)) for a in argv[1:]]
    return [head, *rest]


def _env(container: dict[str, Any], cache: Path, endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    # The pod's volumes, as local directories.
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT",
                 "VLLM_CONFIG_ROOT", "NUMBA_CACHE_DIR", "OUTLINES_CACHE_DIR", "MPLCONFIGDIR"):
        env[name] = str(cache.parent / "scratch" / name.lower())
    env["KUBETUNE_CACHE"] = str(cache)
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        if _get(url + "/ready") == 200:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def quickstart_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """The quickstart (examples/quickstart.yaml, shortened) and a LoRA adapter trained on its output."""
    from kubetune.trainer.cli.specfiles import load_spec
    from kubetune.trainer.train.runner import run

    root = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's data paths are relative to the repository
    try:
        quickstart = load_spec("examples/quickstart.yaml", ["train.maxSteps=30", "logging.samples=0", "checkpoint.everySteps=1000",
                                                             f"output.path={root / 'quickstart'}"]).spec
        run(quickstart)
        adapter = load_spec("examples/quickstart.yaml", ["train.maxSteps=10", "method=lora", "logging.samples=0", "data.evalSize=0", "checkpoint.everySteps=1000",
                                                         f"model.path={root / 'quickstart'}", f"output.path={root / 'support'}"]).spec
        run(adapter)
    finally:
        os.chdir(cwd)
    assert (root / "support" / "adapter_config.json").is_file()
    return root / "quickstart", root / "support"


def test_init_and_server_commands_fetch_once_and_serve_base_and_adapter(s3: S3Env, quickstart_and_adapter: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    model, adapter = quickstart_and_adapter
    s3.upload_tree(model, "models/quickstart")
    s3.upload_tree(adapter, "outputs/support")
    cr = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u"},
        "spec": {"model": {"uri": s3.uri("models/quickstart")}, "adapters": [{"name": "support", "uri": s3.uri("outputs/support")}],
                 "engine": "transformers", "gpus": 0, "port": _free_port(), "terminationGracePeriodSeconds": 20},
    }
    objs = render_inference(cr)
    pod = objs[0]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    server, agent = pod["containers"]
    cache = tmp_path / "node-cache" / "kubetune"
    endpoint = s3.proxy.url
    adapters_dir = tmp_path / "adapters-volume"  # the mounted adapters ConfigMap
    adapters_dir.mkdir()
    (adapters_dir / "adapters.json").write_text(objs[2]["data"]["adapters.json"])

    # Init container: downloads model and adapter into the cache.
    init = subprocess.run(_local([*fetch["command"], *fetch["args"]], adapters_dir), env=_env(fetch, cache, endpoint),
                          capture_output=True, text=True, timeout=180)
    assert init.returncode == 0, init.stderr
    downloaded = s3.proxy.count("GET", s3.bucket, objects_only=True)
    assert downloaded >= 2 and "model: s3://" in init.stdout and "adapter support" in init.stdout

    # Server container: finds everything in the cache (no object GET), becomes ready, serves both names.
    port = cr["spec"]["port"]
    proc = subprocess.Popen(_local([*server["command"], *server["args"]]), env=_env(server, cache, endpoint),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    # The sidecar loads the adapter set into the running server (runtime LoRA API).
    sidecar = subprocess.Popen(_local([*agent["command"], *agent["args"]], adapters_dir), env=_env(agent, cache, endpoint),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc)
        _wait_ready(f"http://127.0.0.1:{port + 1}", sidecar)
        assert _get(url + "/health") == 200
        assert s3.proxy.count("GET", s3.bucket, objects_only=True) == downloaded, "the server downloaded again"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} >= {"chat", "support"}
        for name in ("chat", "support"):
            reply = client.chat.completions.create(model=name, max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert reply.model == name and reply.choices[0].message.content is not None
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop: drain and exit
        # uvicorn drains, then re-raises the signal: exit 0 or "killed by SIGTERM" both mean a clean stop.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in (proc.stdout.read() if proc.stdout else "")
    finally:
        for child in (sidecar, proc):
            if child.poll() is None:
                child.kill()
                child.wait()

    # A second pod on the node (or a restart): the init container finds the same versions.
    again = subprocess.run(_local([*fetch["command"], *fetch["args"]], adapters_dir), env=_env(fetch, cache, endpoint),
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert s3.proxy.count("GET", s3.bucket, objects_only=True) == downloaded, "the second start downloaded again"
