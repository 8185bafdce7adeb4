"""Runtime LoRA loading in `kubetune serve` (the transformers engine), on 127.0.0.1: vLLM's
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` on a live server (greedy output equal to a
server started with the adapters), errors in OpenAI's shape, a request in flight while its adapter
is unloaded; and the InferenceService pods' real `adapters` sidecar driving the server from a
rewritten adapters file (what makes adapter changes restart nothing with either engine)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from kubetune.operator.serving.render import ADAPTERS_FILE, render_inference
from kubetune.trainer.artifacts.adapters import AdapterRef
from kubetune.trainer.serve import create_engine
from kubetune.trainer.serve.server import ServerConfig, create_app

from .test_infer_helpers import build_adapter, foreign_adapter
from .test_inference_pod import _env
from .test_server_openai import free_port, http, running

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def _post(url: str, path: str, body: dict, key: str | None = "secret") -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http("POST", url + path, json.dumps(body).encode(), headers)


def _complete(client: openai.OpenAI, model: str, max_tokens: int = 12) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.model == model
    return reply.choices[0].text


def test_load_and_unload_adapters_at_runtime(tiny_model_dir: Path) -> None:
    support = build_adapter("support", tiny_model_dir, seed=11)
    sales = build_adapter("sales", tiny_model_dir, seed=12)
    reference = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny",
                              adapters=[AdapterRef("support", str(support)), AdapterRef("sales", str(sales))])
    # Started without adapters: the first runtime load turns the plain model into a PEFT model.
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny")
    app = create_app(engine, config=ServerConfig(api_key="secret", batch_wait_s=0.0))
    with running(create_app(reference)) as (ref_url, _), running(app) as (url, _):
        ref = openai.OpenAI(base_url=ref_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=60)
        base = _complete(client, "tiny")
        assert base == _complete(ref, "tiny")
        load = {"lora_name": "support", "lora_path": str(support)}
        assert _post(url, "/v1/load_lora_adapter", load, key=None)[1]["error"]["code"] == "invalid_api_key"
        # An adapter of another base is refused, and leaves the plain model as it was.
        status, error = _post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(foreign_adapter())})
        assert status == 400 and "does not fit the base model" in error["error"]["message"]
        assert _complete(client, "tiny") == base

        assert _post(url, "/v1/load_lora_adapter", load) == (200, "Success: LoRA adapter 'support' added successfully.")
        models = {m.id: m for m in client.models.list().data}
        assert list(models) == ["tiny", "support"]
        assert models["support"].parent == "tiny" and models["support"].root == str(support)  # what the sidecar reads
        assert _complete(client, "support") == _complete(ref, "support") != base

        # Refused with a 400 in OpenAI's shape, nothing changed.
        for body, param in [(load, "lora_name"),  # already loaded, no load_inplace
                            ({"lora_name": "x", "lora_path": str(support.parent / "nowhere")}, "lora_path"),
                            ({"lora_name": "x", "lora_path": str(tiny_model_dir)}, "lora_path"),  # no adapter there
                            ({"lora_name": "x", "lora_path": str(foreign_adapter())}, "lora_path"),  # another base
                            ({"lora_name": "tiny", "lora_path": str(sales)}, "lora_name"),
                            ({"lora_name": "x"}, "lora_path")]:
            status, error = _post(url, "/v1/load_lora_adapter", body)
            assert status == 400 and error["error"]["param"] == param, (body, error)
        assert [m.id for m in client.models.list().data] == ["tiny", "support"]
        assert _complete(client, "support") == _complete(ref, "support")

        # Unloaded while a request for it is generating: that request finishes with it; later
        # ones get a 404 model_not_found.
        expected = ref.completions.create(model="support", prompt=PROMPT, max_tokens=120, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        stream = client.completions.create(model="support", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        pieces = [next(chunks).choices[0].text]
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "support"})[0] == 200
        with pytest.raises(openai.NotFoundError) as info:
            _complete(client, "support")
        assert info.value.code == "model_not_found"
        pieces += [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == expected
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "support"})[0] == 404
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "tiny"})[0] == 400
        assert [m.id for m in client.models.list().data] == ["tiny"]

        # Another adapter, then replaced in place (load_inplace), then the last one unloaded: the
        # model is the plain base again.
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "sales", "lora_path": str(sales)})[0] == 200
        assert _complete(client, "sales") == _complete(ref, "sales")
        inplace = {"lora_name": "sales", "lora_path": str(support), "load_inplace": True}
        assert _post(url, "/v1/load_lora_adapter", inplace)[0] == 200
        assert _complete(client, "sales") == _complete(ref, "support")
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "sales"})[0] == 200
        assert _complete(client, "tiny") == base
        deadline = time.monotonic() + 10
        while hasattr(engine.model, "peft_config") and time.monotonic() < deadline:
            time.sleep(0.05)  # released by the engine thread at its next pass
        assert not hasattr(engine.model, "peft_config")
        metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        assert 'kubetune_requests_total{endpoint="completions",model="sales",status="200"} 2.0' in metrics
        assert 'kubetune_requests_total{endpoint="completions",model="support",status="200"} 3.0' in metrics
        assert 'kubetune_requests_total{endpoint="completions",model="unknown",status="404"} 1.0' in metrics


def test_adapters_sidecar_drives_kubetune_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The rendered `adapters` container of a transformers InferenceService pod against a live
    `kubetune serve`: the adapters file's set is loaded, and a rewrite loads and unloads."""
    support = build_adapter("support", tiny_model_dir, seed=11)
    sales = build_adapter("sales", tiny_model_dir, seed=12)
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="chat")
    app = create_app(engine, config=ServerConfig(api_key="secret", batch_wait_s=0.0))
    with running(app) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        cr = {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
              "metadata": {"name": "chat", "namespace": "ml", "uid": "u"},
              "spec": {"model": {"uri": "s3://models/tiny"}, "adapters": [{"name": "support", "uri": "s3://outputs/support"}],
                       "engine": "transformers", "gpus": 0, "port": port}}
        pod = render_inference(cr)[0]["spec"]["template"]["spec"]
        server, agent = pod["containers"]
        assert "--adapter" not in server["args"] and agent["command"][:3] == ["python", "-m", "kubetune.trainer.serve.adapters"]
        volume = tmp_path / "adapters"
        volume.mkdir()
        config = volume / Path(ADAPTERS_FILE).name

        def write(adapters: dict[str, Path]) -> None:  # as the kubelet swaps a ConfigMap's file
            (volume / ".tmp").write_text(json.dumps({"adapters": [{"name": n, "uri": str(p)} for n, p in adapters.items()]}))
            os.replace(volume / ".tmp", config)

        write({"support": support})
        args = [a.replace(ADAPTERS_FILE, str(config)) for a in agent["args"]]
        agent_port = free_port()
        args[args.index("--port") + 1] = str(agent_port)
        env = _env(agent, tmp_path / "cache" / "kubetune", "http://127.0.0.1:9")
        env.update(KUBETUNE_API_KEY="secret", PYTHONSAFEPATH="1")
        log = tmp_path / "agent.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, *agent["command"][1:], *args, "--interval", "0.2"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        agent_url = f"http://127.0.0.1:{agent_port}"

        def wait_for(served: list[str]) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                try:
                    status, body = http("GET", agent_url + "/status")
                except OSError:  # the sidecar is starting
                    status, body = 0, {}
                models = http("GET", url + "/v1/models", headers={"Authorization": "Bearer secret"})[1]
                if status == 200 and body["ready"] and [m["id"] for m in models["data"]] == served:
                    return
                time.sleep(0.1)
            pytest.fail(f"the sidecar never made the server serve {served}:\n{log.read_text()}")

        try:
            wait_for(["chat", "support"])
            write({"sales.v2": sales})  # any name vLLM takes, dots included
            wait_for(["chat", "sales.v2"])
            status = http("GET", agent_url + "/status")[1]
            assert status["loaded"] == ["sales.v2"] and status["errors"] == {}
            client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=60)
            assert _complete(client, "sales.v2") and _complete(client, "chat")
            with pytest.raises(openai.NotFoundError):
                _complete(client, "support")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
