"""The InferenceService pods' adapter sidecar (`kubetune.trainer.serve.adapters`) against a fake vLLM
that keeps state like vLLM's runtime LoRA API: which loads, unloads and retries it does, and
when the pod is ready. (The real vLLM does the same in tests/test_inference_pod_vllm.py.)"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.serve import adapters as agent_module
from kubetune.trainer.serve.adapters import (
    AdapterFileError,
    AdapterSync,
    Agent,
    VLLMError,
    read_adapters_file,
    serve_http,
)


class FakeVLLM:
    """vLLM's adapter bookkeeping: /v1/models with parents, load (in place) and unload."""

    def __init__(self, static: dict[str, str] | None = None):
        self.loaded: dict[str, str] = dict(static or {})
        self.calls: list[tuple[str, ...]] = []
        self.up = True
        self.refuse: dict[str, str] = {}

    def healthy(self) -> bool:
        return self.up

    def adapters(self) -> dict[str, str]:
        if not self.up:
            raise VLLMError("connection refused")
        return dict(self.loaded)

    def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        self.calls.append(("load", name, path, "inplace" if inplace else ""))
        if name in self.refuse:
            raise VLLMError(self.refuse[name])
        if name in self.loaded and not inplace:
            raise VLLMError(f"The lora adapter '{name}' has already been loaded.")
        self.loaded[name] = path

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.loaded.pop(name, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _local_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Localizing is the storage layer's job (tested there): a URI maps to a cache path here."""
    def localize(name: str, location: str, storage: Any = None) -> str:
        if "missing" in location:
            raise ValueError(f"adapter {name}: {location!r} does not exist")
        return "/cache/" + location.removeprefix("s3://")

    monkeypatch.setattr(agent_module, "localize", localize)


def test_sync_loads_reloads_in_place_unloads_and_keeps_the_static_name() -> None:
    vllm = FakeVLLM(static={"chat": "/cache/model-lora"})  # the model's own adapter, loaded by vLLM at start
    sync = AdapterSync(vllm, keep=("chat",))  # type: ignore[arg-type]
    report = sync.sync({"a": "s3://b/a", "b": "s3://b/b"})
    assert report.loaded == ["a", "b"] and report.missing == [] and report.failed == {}
    assert sync.sync({"a": "s3://b/a", "b": "s3://b/b"}).loaded == []  # nothing to do: no calls
    assert len(vllm.calls) == 2
    # b moves to a new location: reloaded in place (never absent); a removed: unloaded; chat kept.
    report = sync.sync({"b": "s3://b/b-v2"})
    assert report.loaded == ["b"] and report.unloaded == ["a"]
    assert vllm.calls[-2:] == [("load", "b", "/cache/b/b-v2", "inplace"), ("unload", "a")]
    assert vllm.loaded == {"chat": "/cache/model-lora", "b": "/cache/b/b-v2"}


def test_changes_made_by_others_through_the_runtime_api_are_reverted() -> None:
    vllm = FakeVLLM()
    sync = AdapterSync(vllm)  # type: ignore[arg-type]
    sync.sync({"a": "s3://b/a"})
    vllm.loaded["a"] = "/elsewhere/evil"  # a client reloaded it in place from another path
    vllm.loaded["extra"] = "/elsewhere/x"  # and loaded a name the ConfigMap does not have
    report = sync.sync({"a": "s3://b/a"})
    assert report.loaded == ["a"] and report.unloaded == ["extra"]
    assert vllm.loaded == {"a": "/cache/b/a"}
    del vllm.loaded["a"]  # a client unloaded it
    assert sync.sync({"a": "s3://b/a"}).loaded == ["a"]


def test_a_restarted_agent_adopts_what_vllm_serves_and_a_restarted_vllm_gets_everything_again() -> None:
    vllm = FakeVLLM()
    vllm.loaded = {"a": "/cache/b/a"}
    sync = AdapterSync(vllm)  # type: ignore[arg-type]
    assert sync.sync({"a": "s3://b/a"}).loaded == [] and vllm.calls == []  # adopted, not reloaded
    vllm.loaded = {}  # the server container restarted
    assert sync.sync({"a": "s3://b/a"}).loaded == ["a"]


def test_failures_back_off_and_only_block_readiness_of_a_new_pod(tmp_path: Path) -> None:
    config = tmp_path / "adapters.json"
    config.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/a"}]}))
    vllm = FakeVLLM()
    agent = Agent(config, vllm, interval=0.01)  # type: ignore[arg-type]
    clock = Clock()
    agent.syncer.clock = clock
    vllm.up = False
    agent.round()
    assert agent.ready is False  # vLLM still loading the model
    vllm.up = True
    agent.round()
    assert agent.ready is True and vllm.loaded == {"a": "/cache/b/a"}

    # A new adapter that cannot be loaded: the serving pod stays ready, the error is reported,
    # and the load is retried after a growing delay, not on every pass.
    config.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/a"}, {"name": "big", "uri": "s3://b/big"}]}))
    vllm.refuse["big"] = "LoRA rank 64 is greater than max_lora_rank 16."
    agent.round()
    assert agent.ready is True and "max_lora_rank" in agent.status()["errors"]["big"]
    calls = len(vllm.calls)
    agent.round()
    assert len(vllm.calls) == calls  # waiting for the retry time
    clock.now += 6
    agent.round()
    assert len(vllm.calls) == calls + 1
    del vllm.refuse["big"]
    clock.now += 11
    agent.round()
    assert "big" in vllm.loaded and agent.status()["errors"] == {}

    # An adapter the pod served and lost (vLLM restarted) makes it unready until reloaded.
    vllm.refuse["a"] = "out of memory"
    vllm.loaded = {}
    agent.round()
    assert agent.ready is False
    # A brand-new pod with a broken adapter is not ready: it would not serve the whole set.
    fresh = Agent(config, FakeVLLM(), interval=0.01)  # type: ignore[arg-type]
    fresh.client.refuse["big"] = "bad"  # type: ignore[attr-defined]
    fresh.round()
    assert fresh.ready is False


def test_adapters_file_errors_are_clear_and_the_last_good_set_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "adapters.json"
    config.write_text("{not json")
    with pytest.raises(AdapterFileError, match="cannot read the adapters file"):
        read_adapters_file(config)
    config.write_text(json.dumps({"adapters": [{"name": "a"}]}))
    with pytest.raises(AdapterFileError, match="string name and uri"):
        read_adapters_file(config)
    config.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/a"}]}))
    agent = Agent(config, FakeVLLM(), interval=0.01)  # type: ignore[arg-type]
    agent.round()
    config.write_text("")
    agent.round()
    assert agent.wanted == {"a": "s3://b/a"} and "cannot read" in (agent.last_error or "")


def test_probe_endpoints() -> None:
    agent = Agent("/nonexistent", FakeVLLM(), interval=0.01)  # type: ignore[arg-type]
    server = serve_http(agent, 0, "127.0.0.1")
    port = server.server_address[1]
    try:
        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        assert get("/ready") == 503 and get("/health") == 200
        agent.ready = True
        assert get("/ready") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            assert json.loads(response.read())["ready"] is True
    finally:
        server.shutdown()


def test_fetch_reads_the_adapters_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The init container fetches the set in the mounted file, like `--adapter` arguments."""
    from kubetune.trainer.serve import fetch

    seen: dict[str, Any] = {}
    monkeypatch.setattr(fetch, "fetch", lambda model, adapters, draft=None: seen.update(model=model, adapters=adapters) or [])
    config = tmp_path / "adapters.json"
    config.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/a"}]}))
    assert fetch.main(["--model", "s3://m", "--adapter", "x=s3://x", "--adapters-file", str(config)]) == 0
    assert seen == {"model": "s3://m", "adapters": ["x=s3://x", "a=s3://b/a"]}
    config.write_text("[]")
    assert fetch.main(["--model", "s3://m", "--adapters-file", str(config)]) == 2


def test_the_agent_sends_the_services_api_key_on_every_call() -> None:
    """The operator passes the generated key as KUBETUNE_API_KEY: the agent sends it as a Bearer
    token on /v1/models, /v1/load_lora_adapter and /v1/unload_lora_adapter (the server refuses
    those without it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubetune.trainer.serve.adapters import VLLMClient, api_key_from_env

    seen: list[tuple[str, str | None]] = []

    class Server(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            ok = self.headers.get("Authorization") == "Bearer k3y"
            body = json.dumps({"data": []} if ok else {"error": {"message": "Incorrect API key"}}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert api_key_from_env({"KUBETUNE_API_KEY": "k3y", "VLLM_API_KEY": "other"}) == "k3y"
        assert api_key_from_env({"VLLM_API_KEY": "own"}) == "own" and api_key_from_env({}) is None
        client = VLLMClient(f"http://127.0.0.1:{httpd.server_port}", api_key_from_env({"KUBETUNE_API_KEY": "k3y"}))
        assert client.adapters() == {}
        client.load("sales", "/cache/sales")
        client.unload("sales")
        assert [p for p, _ in seen] == ["/v1/models", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
        assert {auth for _, auth in seen} == {"Bearer k3y"}
        with pytest.raises(VLLMError, match="Incorrect API key"):
            VLLMClient(f"http://127.0.0.1:{httpd.server_port}").load("x", "/cache/x")
    finally:
        httpd.shutdown()
