"""`kubetune serve` against hostile or careless requests (issue #15): oversize bodies (413 before
they are read), prompts too long to tokenize, a big prompt in flight while probes must answer,
client mistakes that used to be 500s, the OpenAPI document and a schemathesis run over it (no
5xx), and access to the runtime adapter endpoints (allowed roots, no file-system details in
errors, a cap, `/ready` without names for callers without the key)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from kubetune.trainer.serve import create_engine
from kubetune.trainer.serve.guards import MAX_CHARS_PER_TOKEN
from kubetune.trainer.serve.server import ServerConfig, create_app
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

from .test_infer_helpers import build_adapter
from .test_server_openai import http, running

pytestmark = pytest.mark.slow

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # A short context keeps generated requests (schemathesis) quick on CPU.
    return create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny", max_model_len=64)


@pytest.fixture(scope="module")
def served(engine):
    app = create_app(engine, config=ServerConfig(max_request_bytes=LIMIT, batch_wait_s=0.0))
    with running(app) as (url, _server):
        yield url


def _raw_request(url: str, head: str, chunks, timeout: float = 10.0) -> tuple[int, dict, int, float]:
    """Send `head` then `chunks` on a raw socket, stopping once the server answers (or closes).
    Returns (status, JSON body, bytes of body sent, seconds until the answer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    started = time.monotonic()
    sent = 0
    try:
        sock.sendall(head.encode())
        sock.setblocking(False)
        for chunk in chunks:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered: stop sending
            except BlockingIOError:
                pass
            try:
                sock.setblocking(True)
                sock.settimeout(timeout)
                sock.sendall(chunk)
                sent += len(chunk)
                sock.setblocking(False)
            except OSError:  # the server answered and closed: read what it said
                break
        sock.setblocking(True)
        sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(body), sent, elapsed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def _assert_error_shape(body: dict, status: int) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# -- item 2: request limits ------------------------------------------------------------------------
def test_declared_oversize_body_is_refused_before_it_is_read(served):
    """50 MB announced by Content-Length: the 413 comes at once, after a few bytes of body."""
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\n\r\n")
    chunks = (b"x" * 65536 for _ in range(800))
    status, body, sent, elapsed = _raw_request(served, head, chunks)
    error = _assert_error_shape(body, status)
    assert status == 413 and error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert sent < 50 * 1024 * 1024 and elapsed < 5


def test_chunked_oversize_body_is_refused_once_past_the_limit(served):
    """No Content-Length (chunked): the server counts what arrives and answers once past the limit,
    long before the client would have sent 50 MB."""
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(800))
    status, body, sent, _ = _raw_request(served, head, chunks)
    assert status == 413 and _assert_error_shape(body, status)["code"] == "request_too_large"
    assert sent < 20 * LIMIT  # what the socket buffers hold past the limit, not 50 MB


def test_overlong_prompt_is_refused_without_tokenizing(engine, served, monkeypatch):
    calls = []
    original = engine.encode_text
    monkeypatch.setattr(engine, "encode_text", lambda text: calls.append(len(text)) or original(text))
    too_long = "a" * (engine.context_length * MAX_CHARS_PER_TOKEN + 1)
    status, body = http("POST", served + "/v1/completions", json.dumps({"model": "tiny", "prompt": too_long}).encode())
    error = _assert_error_shape(body, status)
    assert status == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert calls == []
    chat = {"model": "tiny", "messages": [{"role": "user", "content": too_long}]}
    status, body = http("POST", served + "/v1/chat/completions", json.dumps(chat).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _ = http("POST", served + "/v1/completions", json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode())
    assert status == 200 and calls == [2]  # a normal prompt is tokenized as before


def test_health_answers_while_a_prompt_is_being_tokenized(engine, served, monkeypatch):
    """Tokenizing runs off the event loop: while one request's prompt is being tokenized (held
    here until /health has answered), probes are served."""
    tokenizing, release = threading.Event(), threading.Event()
    original = engine.encode_text

    def slow_encode(text):
        tokenizing.set()
        assert release.wait(30)
        return original(text)

    monkeypatch.setattr(engine, "encode_text", slow_encode)
    result = {}
    body = json.dumps({"model": "tiny", "prompt": "Hello there", "max_tokens": 2}).encode()
    worker = threading.Thread(target=lambda: result.update(reply=http("POST", served + "/v1/completions", body)))
    worker.start()
    try:
        assert tokenizing.wait(30)
        assert _get_status(served + "/health", timeout=5) == 200
        assert _get_status(served + "/ready", timeout=5) == 200
    finally:
        release.set()
        worker.join(30)
    assert result["reply"][0] == 200


def _get_status(url: str, timeout: float) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


# -- item 9: client errors are 400s -------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, "prompt"),
    ({"model": "tiny", "prompt": ["ok", ""]}, "prompt"),
    ({"model": "tiny", "prompt": "", "echo": True, "max_tokens": 0, "logprobs": 1}, "prompt"),
    ({"model": "tiny", "prompt": "Hi", "echo": True, "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "Hi", "seed": 2**63, "max_tokens": 2}, "seed"),
    ({"model": "tiny", "prompt": "Hi", "seed": 2**64, "max_tokens": 2}, "seed"),
    ({"model": "tiny", "prompt": "Hi", "seed": -(2**63) - 1, "max_tokens": 2}, "seed"),
])
def test_client_mistakes_are_400s(served, body, param):
    status, reply = http("POST", served + "/v1/completions", json.dumps(body).encode())
    error = _assert_error_shape(reply, status)
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", reply


@pytest.mark.parametrize("depth", [65, 5000, 100_000])
def test_deeply_nested_json_is_a_400(served, depth):
    for path, key in [("/v1/completions", "prompt"), ("/v1/chat/completions", "tools"), ("/v1/load_lora_adapter", "x")]:
        raw = f'{{"model": "tiny", "{key}": ' + "[" * depth + "]" * depth + "}"
        status, reply = http("POST", served + path, raw.encode())
        error = _assert_error_shape(reply, status)
        assert status == 400 and error["code"] == "invalid_json" and "deep" in error["message"], (path, reply)
    status, _ = http("GET", served + "/health")
    assert status == 200


def test_openapi_document_declares_the_request_bodies(served):
    status, doc = http("GET", served + "/openapi.json")
    assert status == 200
    bodies = {path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
              for path, ops in doc["paths"].items() if "post" in ops}
    assert bodies == {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
                      "/v1/load_lora_adapter": "LoadLoraAdapterRequest", "/v1/unload_lora_adapter": "UnloadLoraAdapterRequest"}
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert set(completion["required"]) == {"model", "prompt"}
    assert completion["properties"]["seed"]["anyOf"][0]["maximum"] == pytest.approx(2**63 - 1)  # written as a float


def test_schemathesis_finds_no_server_errors(served):
    """Generated requests (valid and invalid) for every operation of /openapi.json: none is a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(served + "/openapi.json")
    failures, statuses = [], set()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=served, timeout=60)
                statuses.add(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

            try:
                check()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode == GenerationMode.NEGATIVE and not operation.body
    assert failures == []
    assert {200, 400} <= statuses  # generation requests ran, and invalid ones were refused


# -- item 4: the adapter admin API -----------------------------------------------------------------------
def _post(url: str, path: str, body: dict, key: str | None = "secret") -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http("POST", url + path, json.dumps(body).encode(), headers)


def test_adapter_paths_are_confined_and_errors_reveal_nothing(tiny_model_dir, tmp_path):
    support = build_adapter("support", tiny_model_dir, seed=11)  # under the model cache
    outside = tmp_path / "elsewhere" / "support"
    shutil.copytree(support, outside)
    (tmp_path / "plain").mkdir()
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny")
    app = create_app(engine, config=ServerConfig(api_key="secret", batch_wait_s=0.0))
    with running(app) as (url, _):
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(support)}, key=None)[0] == 401
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "a"}, key="wrong")[0] == 401
        replies = []
        for path in [outside, tmp_path / "missing", tmp_path / "plain", Path("/etc"), "/etc/passwd", "../../etc",
                     "builtin:tiny-llama", "someorg/some-model", "s3://models/support", "s3://b/x/../../../../tmp/"]:
            status, reply = _post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
            error = _assert_error_shape(reply, status)
            assert status == 400 and error["param"] == "lora_path", reply
            assert str(path) not in error["message"] and str(tmp_path) not in error["message"]
            replies.append(reply)
        assert all(r == replies[0] for r in replies)  # exists or not, adapter or not: the same answer
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(support)})[0] == 200
        assert [m["id"] for m in http("GET", url + "/v1/models", headers={"Authorization": "Bearer secret"})[1]["data"]] == ["tiny", "a"]
    # An --adapter-root opens a directory outside the cache.
    app = create_app(engine, config=ServerConfig(adapter_roots=[str(tmp_path / "elsewhere")], batch_wait_s=0.0))
    with running(app) as (url, _):
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(outside)}, key=None)[0] == 200


def test_adapter_count_is_capped(tiny_model_dir):
    support = build_adapter("support", tiny_model_dir, seed=11)
    sales = build_adapter("sales", tiny_model_dir, seed=12)
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny")
    app = create_app(engine, config=ServerConfig(max_adapters=1, batch_wait_s=0.0))
    with running(app) as (url, _):
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(support)}, key=None)[0] == 200
        status, reply = _post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(sales)}, key=None)
        error = _assert_error_shape(reply, status)
        assert status == 409 and error["code"] == "adapter_limit_reached" and "--max-adapters" in error["message"]
        inplace = {"lora_name": "a", "lora_path": str(sales), "load_inplace": True}
        assert _post(url, "/v1/load_lora_adapter", inplace, key=None)[0] == 200  # replacing is no extra adapter
        assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "a"}, key=None)[0] == 200
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(sales)}, key=None)[0] == 200


def test_ready_lists_models_only_to_callers_with_the_key(tiny_model_dir):
    def engine():
        return create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny")

    app = create_app(engine(), config=ServerConfig(api_key="secret"))
    with running(app) as (url, _):
        assert http("GET", url + "/ready") == (200, {"status": "ready"})
        assert http("GET", url + "/ready", headers={"Authorization": "Bearer wrong"}) == (200, {"status": "ready"})
        status, body = http("GET", url + "/ready", headers={"Authorization": "Bearer secret"})
        assert status == 200 and body["models"] == ["tiny"]
    with running(create_app(engine())) as (url, _):  # no key configured: nothing to hide
        assert http("GET", url + "/ready")[1]["models"] == ["tiny"]


def test_s3_key_with_dot_dot_cannot_write_outside_the_cache(tiny_model_dir, s3: S3Env):
    """`s3://bucket/x/../../../../elsewhere/` used to be localized to `<cache>/../../elsewhere`
    through /v1/load_lora_adapter, even with its bucket allowed; it is refused, nothing is written."""
    support = build_adapter("support", tiny_model_dir, seed=11)
    s3.upload_tree(support, "x/../../../../elsewhere")  # S3 stores such keys literally
    s3.upload_tree(support, "adapters/support")
    outside = s3.cache.parent
    before = sorted(p for p in outside.rglob("*") if s3.cache not in p.parents and p != s3.cache)
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny")
    app = create_app(engine, config=ServerConfig(storage=s3.settings(), adapter_roots=[s3.uri()], batch_wait_s=0.0))
    with running(app) as (url, _):
        status, reply = _post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": s3.uri("x/../../../../elsewhere/")})
        assert status == 400 and _assert_error_shape(reply, status)["param"] == "lora_path"
        assert "elsewhere" not in reply["error"]["message"]
        after = sorted(p for p in outside.rglob("*") if s3.cache not in p.parents and p != s3.cache)
        assert after == before
        # The same bucket's well-formed keys load (the root allows the bucket).
        assert _post(url, "/v1/load_lora_adapter", {"lora_name": "s", "lora_path": s3.uri("adapters/support/")})[0] == 200
