"""The InferenceService pod contract with the real vLLM engine (its CPU build, `.venv-vllm`).

The rendered Deployment's containers run as local processes with their own argv and environment
(the image's `python` and `kubetune` mapped to the vLLM venv's, the pod's volumes to local
directories, S3 on moto): the init container fetches the model and the adapter set from the
mounted adapters file, `kubetune serve --engine vllm` execs vLLM's OpenAI server, and the
`adapters` sidecar loads the adapters into it. Then, as the kubelet does when the operator
patches the adapters ConfigMap, the file changes: the sidecar loads a new adapter and unloads a
removed one in the running server, with no restart (the code path the operator relies on for
restart-free adapter changes). One vLLM start for the whole module (20-60 s on two cores).

Skipped, with the reason, when `.venv-vllm` (created by `.ci/setup-vllm.sh`; CI builds it) or
`$KUBETUNE_VLLM_PYTHON` is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from kubetune.operator.serving.render import ADAPTERS_FILE, ADAPTERS_MOUNT, agent_port, render_inference
from kubetune.operator.validation import validate_resource
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env
from tests.test_infer_helpers import build_adapter
from tests.test_inference_pod import _env, _free_port
from tests.test_vllm_real import _skip_reason, _stop, _tail, vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

STARTUP_TIMEOUT_S = 240
CHANGE_TIMEOUT_S = 60


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError:
        return 0, ""


def _local(argv: list[str], python: str, adapters_dir: Path) -> list[str]:
    """The container's argv with the image's programs replaced by the vLLM venv's and the
    adapters volume's mount path by its local directory."""
    head = {"python": python, "kubetune": str(Path(python).parent / "kubetune")}.get(argv[0], argv[0])
    return [head, *(a.replace(ADAPTERS_MOUNT, str(adapters_dir)) for a in argv[1:])]


def _write_adapters(adapters_dir: Path, document: str) -> None:
    """Replace the adapters file atomically, as the kubelet swaps a ConfigMap volume's files."""
    tmp = adapters_dir / ".adapters.json.tmp"
    tmp.write_text(document)
    os.replace(tmp, adapters_dir / Path(ADAPTERS_FILE).name)


def _wait(check: Any, timeout: float, what: str, procs: list[tuple[subprocess.Popen, Path]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[:3]} exited with {proc.returncode} while waiting for {what}:\n{_tail(log)}")
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n" + "\n".join(_tail(log) for _, log in procs))


def test_vllm_pod_serves_from_s3_and_loads_adapters_without_restart(s3: S3Env, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    python = vllm_python()
    reason = _skip_reason(python)
    if reason:
        pytest.skip(reason)
    assert python is not None
    support = build_adapter("support", tiny_model_dir, seed=11)
    sales = build_adapter("sales", tiny_model_dir, seed=12)
    s3.upload_tree(tiny_model_dir, "models/tiny")
    s3.upload_tree(support, "outputs/support")
    s3.upload_tree(sales, "outputs/sales")
    port = _free_port()
    cr = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u"},
        "spec": {
            "model": {"uri": s3.uri("models/tiny")},
            "adapters": [{"name": "support", "uri": s3.uri("outputs/support")}],
            "engine": "vllm", "gpus": 0, "port": port, "terminationGracePeriodSeconds": 20,
            "engineArgs": {"dtype": "float32", "maxModelLen": 256, "maxBatchSize": 4},
            # vLLM's CPU build sizes its KV cache from this (GiB), not from the GPU memory fraction.
            "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
        },
    }
    objs = {o["kind"]: o for o in render_inference(cr)}
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    server, agent = pod["containers"]
    assert [c["name"] for c in pod["containers"]] == ["server", "adapters"]
    cache = tmp_path / "node-cache" / "kubetune"
    adapters_dir = tmp_path / "adapters-volume"
    adapters_dir.mkdir()
    _write_adapters(adapters_dir, objs["ConfigMap"]["data"]["adapters.json"])
    endpoint = s3.proxy.url

    def env_of(container: dict[str, Any]) -> dict[str, str]:
        env = _env(container, cache, endpoint)
        env.update(PYTHONSAFEPATH="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
        for name in ("VLLM_API_KEY", "KUBETUNE_API_KEY", "VIRTUAL_ENV"):
            env.pop(name, None)
        return env

    # Init container: the model and the adapter set of the mounted file, into the cache.
    init = subprocess.run(_local([*fetch["command"], *fetch["args"]], python, adapters_dir), env=env_of(fetch),
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "model: s3://" in init.stdout and "adapter support" in init.stdout
    downloaded = s3.proxy.count("GET", s3.bucket, objects_only=True)

    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for container in (server, agent):
            log_path = tmp_path / f"{container['name']}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(_local([*container["command"], *container["args"]], python, adapters_dir),
                                        env=env_of(container), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                        start_new_session=True)
            procs.append((proc, log_path))
        url, agent_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agent_port(validate_resource(cr))}"

        # The pod is ready when vLLM is up and the sidecar has loaded the whole adapter set.
        _wait(lambda: _get(agent_url + "/ready")[0] == 200, STARTUP_TIMEOUT_S, "the adapters sidecar's /ready", procs)
        assert s3.proxy.count("GET", s3.bucket, objects_only=True) == downloaded, "a container downloaded again"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"chat", "support"} and models["support"].parent == "chat"
        for name in ("chat", "support"):
            reply = client.completions.create(model=name, prompt="The capital of France is", max_tokens=4, temperature=0)
            assert reply.model == name and reply.choices[0].text

        # The operator patches the ConfigMap (one adapter added, one removed); the kubelet
        # refreshes the file. The running server loads and unloads them: no restart.
        server_pid = procs[0][0].pid
        document = json.dumps({"adapters": [{"name": "sales", "uri": s3.uri("outputs/sales")}]})
        _write_adapters(adapters_dir, document)

        def served() -> set[str]:
            status, text = _get(url + "/v1/models")
            return {m["id"] for m in json.loads(text)["data"]} if status == 200 else set()

        _wait(lambda: served() == {"chat", "sales"}, CHANGE_TIMEOUT_S, "sales loaded and support unloaded", procs)
        reply = client.completions.create(model="sales", prompt="The capital of France is", max_tokens=4, temperature=0)
        assert reply.model == "sales" and reply.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="support", prompt="Hello", max_tokens=2)
        assert procs[0][0].poll() is None and procs[0][0].pid == server_pid  # the same server process
        status = json.loads(_get(agent_url + "/status")[1])
        assert status["ready"] is True and status["loaded"] == ["sales"] and status["errors"] == {}
        assert _get(agent_url + "/ready")[0] == 200
        # Each adapter was loaded once: the sidecar's later passes changed nothing.
        passes = status["passes"]
        _wait(lambda: json.loads(_get(agent_url + "/status")[1])["passes"] >= passes + 2, CHANGE_TIMEOUT_S,
              "two more passes of the sidecar", procs)
        loads = procs[0][1].read_text(errors="replace").count("Loaded new LoRA adapter")
        assert loads == 2, _tail(procs[1][1])
    finally:
        for proc, _ in reversed(procs):
            _stop(proc)
