"""`kubetune serve` through the official `openai` client, on 127.0.0.1: models, chat, streaming,
n, adapters by name, errors in OpenAI's shape, batching of concurrent streams, continuous batching
(requests join a running batch), logprobs and best_of, tools, disconnects, metrics, probes,
API-key auth, and draining on SIGTERM (readiness off, in-flight requests finish)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest

from kubetune.trainer.artifacts.adapters import AdapterRef
from kubetune.trainer.serve import create_engine
from kubetune.trainer.serve.server import ServerConfig, create_app, make_server

from .test_infer_helpers import build_adapter

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, **uvicorn_kwargs):
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_kwargs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    adapter = build_adapter("support", tiny_model_dir, seed=11)
    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny", adapters=[AdapterRef("support", str(adapter))])
    app = create_app(engine, config=ServerConfig(max_batch_size=16, batch_wait_s=0.02))
    with running(app) as (url, _server):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


HI = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_base_and_adapter(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "support"]
    assert client.models.retrieve("support").id == "support"


def test_chat_completion(client):
    response = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 5
    again = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_streamed_chat_arrives_in_chunks(client):
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    arrivals, pieces, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                arrivals.append(time.monotonic())
            finish = choice.finish_reason or finish
    assert len(pieces) >= 5, pieces
    assert arrivals[-1] - arrivals[0] > 0  # incremental, not one burst at the end
    assert finish == "length" and usage.completion_tokens == 24
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert "".join(pieces) == plain.choices[0].message.content


def test_completion_with_n_and_seed(client):
    kwargs = {"model": "tiny", "prompt": "The capital of", "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 2}
    response = client.completions.create(**kwargs)
    assert response.object == "text_completion" and len(response.choices) == 2
    assert [c.index for c in response.choices] == [0, 1]
    texts = [c.text for c in response.choices]
    assert texts[0] != texts[1]  # the two samples use different seeds
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts  # reproducible
    stopped = client.completions.create(model="tiny", prompt="The capital of", max_tokens=30, temperature=0, stop=["a"])
    assert "a" not in stopped.choices[0].text


def test_adapter_selected_by_model_name(client):
    args = {"messages": HI, "max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    base = client.chat.completions.create(model="tiny", **args).choices[0].message.content
    tuned = client.chat.completions.create(model="support", **args)
    assert tuned.model == "support"
    assert tuned.choices[0].message.content != base


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "capital " * 400}])
    assert info.value.code == "context_length_exceeded" and "maximum context length is 256" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=250)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.code == "model_not_found" and "tiny, support" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, temperature=7)
    assert info.value.param == "temperature"
    url = server[0]
    status, body = http("POST", url + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"
    status, body = http("POST", url + "/v1/completions", json.dumps({"model": "tiny"}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = http("POST", url + "/v1/chat/completions", json.dumps({"model": "tiny", "messages": []}).encode())
    assert status == 400 and "error" in body
    status, body = http("GET", url + "/v1/nope")
    assert status == 404 and "error" in body


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    """The base model loaded on its own: logprobs must match its plain forward passes."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _forward_logprobs(model, ids: list[int]):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_logprobs_match_a_forward_pass(client, server, reference_model):
    """Chat (`logprobs` + `top_logprobs`) and completions (`logprobs: k`) return OpenAI's shapes;
    every chosen token's logprob is the model's own log-softmax at that position."""
    engine = server[1].state.kubetune.engine
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert "".join(entry.token for entry in content).strip() == chat.choices[0].message.content.strip()
    ids = engine.encode_chat([dict(m) for m in HI], "tiny")
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.bytes == list(entry.token.encode())
        expected = _forward_logprobs(reference_model, ids)
        token = int(expected.argmax())  # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.logprob - float(expected[token])) < 1e-4
        ids.append(token)

    completion = client.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0.7, seed=3,
                                           logprobs=2, extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(top) <= 2 for top in lp.top_logprobs)
    first = _forward_logprobs(reference_model, engine.encode_text("The capital of"))
    assert max(lp.top_logprobs[0].values()) == pytest.approx(float(first.max()), abs=1e-4)
    # echo + logprobs + max_tokens 0 scores a prompt (what lm-eval-harness's loglikelihood requests do).
    prompt = "The capital of France is Paris"
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp, ids = scored.choices[0].logprobs, engine.encode_text(prompt)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text.strip() == prompt
    assert "".join(lp.tokens) == scored.choices[0].text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    import torch

    with torch.inference_mode():
        full = torch.log_softmax(reference_model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(full[j - 1, ids[j]])) < 1e-4
    streamed = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True})
    pieces = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]


def test_best_of_returns_the_most_likely_samples(client):
    """best_of=3 samples three (seeds s, s+1, s+2, as n=3 would) and returns the one with the
    highest mean token logprob."""
    kwargs = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.5, "seed": 11,
              "extra_body": {"ignore_eos": True}}
    samples = client.completions.create(n=3, logprobs=0, **kwargs).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in samples]
    assert len({c.text for c in samples}) > 1
    best = client.completions.create(best_of=3, **kwargs)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == samples[means.index(max(means))].text
    assert best.usage.completion_tokens == 18  # every sample counts
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(best_of=2, n=3, **kwargs)
    assert info.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(best_of=3, stream=True, **kwargs)
    assert info.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, top_logprobs=2)
    assert info.value.param == "top_logprobs"


def test_tools_reach_the_template(client, server):
    """Tools are rendered by templates that use them, and refused (400) by one that would drop them."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1)
    with_tools = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the tool schema is in the prompt
    with pytest.raises(openai.BadRequestError) as info:  # nothing could make the model call it
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, tools=tools, tool_choice="required")
    assert info.value.param == "tool_choice"
    engine = server[1].state.kubetune.engine
    saved = engine.templates["support"]
    engine.set_template("{% for m in messages %}{{ m['content'] }}{% endfor %}", model="support")
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="support", messages=HI, max_tokens=1, tools=tools)
        assert info.value.param == "tools" and "does not render tools" in info.value.message
        assert client.chat.completions.create(model="support", messages=HI, max_tokens=1, tools=tools,
                                              tool_choice="none").choices[0].message.content is not None
    finally:
        engine.templates["support"] = saved


def _stream_once(client, max_tokens=32):
    started = time.monotonic()
    chunks = 0
    for chunk in client.chat.completions.create(model="tiny", messages=HI, max_tokens=max_tokens, temperature=0.8,
                                                stream=True, extra_body={"ignore_eos": True}):
        chunks += sum(1 for c in chunk.choices if c.delta.content)
    return time.monotonic() - started, chunks


def test_concurrent_streams_are_batched(client, server):
    _stream_once(client)  # warm up
    single = sorted(_stream_once(client)[0] for _ in range(3))[1]  # the median: one slow outlier does not set the bar
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _stream_once(client), range(16)))
    total = time.monotonic() - started
    assert all(chunks >= 5 for _, chunks in results)
    assert total < 0.5 * 16 * single, (total, single)
    _, metrics = http("GET", server[0] + "/metrics")
    batch_sum = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("kubetune_batch_size_sum")))
    batch_count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("kubetune_batch_size_count")))
    assert batch_sum / batch_count > 1.5  # requests really ran together


def test_continuous_batching_admits_requests_mid_batch(client, server):
    """A short request sent while a long one is generating finishes first: it joined the running
    batch at a token step instead of waiting for the batch to end. Each greedy output is exactly
    what the request produces alone (the short one on an adapter, the long one on the base)."""
    long_args = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 230, "temperature": 0,
                 "extra_body": {"ignore_eos": True}}
    short_args = {"model": "support", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
    stream = iter(client.completions.create(stream=True, **long_args))
    long_text = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].text).choices[0].text
    short = client.completions.create(**short_args)
    # The short request is done and the long one is still in the running batch (with whole-batch
    # scheduling the short one could only have started after the long one had finished, and the
    # batch would be empty now). The gauge follows the engine thread within a step: wait for it.
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    deadline = time.monotonic() + 10
    while (running := _metric(server[0], "kubetune_requests_running")) > 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert running == 1
    finish = None
    for chunk in stream:
        if chunk.choices:
            long_text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert short.choices[0].text == client.completions.create(**short_args).choices[0].text
    assert long_text == client.completions.create(**long_args).choices[0].text


def _metric(url: str, name: str) -> float:
    _, text = http("GET", url + "/metrics")
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_disconnect_frees_the_slot(client, server):
    url, _ = server
    before = _metric(url, "kubetune_sequences_cancelled_total")
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=230, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while _metric(url, "kubetune_requests_in_flight") or _metric(url, "kubetune_requests_running"):
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.05)
    # It left the batch early (cancelled), not by running to its 230 tokens.
    assert _metric(url, "kubetune_sequences_cancelled_total") == before + 1
    _, text = http("GET", url + "/metrics")
    assert 'status="499"' in text


def test_probes_and_metrics(server, client):
    url, _ = server
    assert http("GET", url + "/health") == (200, {"status": "ok"})
    status, body = http("GET", url + "/ready")
    assert status == 200 and body["models"] == ["tiny", "support"]
    client.chat.completions.create(model="support", messages=HI, max_tokens=4)
    _, text = http("GET", url + "/metrics")
    for name in ("kubetune_requests_total", "kubetune_generation_tokens_total", "kubetune_request_duration_seconds_bucket",
                 "kubetune_queue_depth", "kubetune_requests_in_flight", "kubetune_model_ready 1.0"):
        assert name in text, name
    assert 'kubetune_requests_total{endpoint="chat",model="support",status="200"}' in text
    assert 'status="404"' in text  # the unknown-model request was counted too


def test_api_key_and_background_loading(tiny_model_dir, monkeypatch):
    loaded = threading.Event()

    def slow_loader():
        loaded.wait(10)
        return create_engine(str(tiny_model_dir), engine="transformers")

    app = create_app(loader=slow_loader, config=ServerConfig(api_key="s3cret"))
    with running(app) as (url, _):
        assert http("GET", url + "/health")[0] == 200
        assert http("GET", url + "/ready")[0] == 503  # alive, not ready while the model loads
        loaded.set()
        deadline = time.monotonic() + 30
        while http("GET", url + "/ready")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [tiny_model_dir.name]
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert http("GET", url + "/metrics")[0] == 200  # scraping needs no key


def test_sigterm_turns_readiness_off_and_drains(tiny_model_dir):
    """SIGTERM: /ready answers 503 at once (the Service stops routing here) while the server still
    serves for --drain-delay; a second signal closes the listener; the in-flight stream finishes."""
    engine = create_engine(str(tiny_model_dir), engine="transformers")
    app = create_app(engine, config=ServerConfig(drain_timeout_s=20, drain_delay_s=120))
    with running(app) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model=tiny_model_dir.name, prompt="Hello", max_tokens=120, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)  # the request is in flight
        assert http("GET", url + "/ready")[0] == 200
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        status, body = http("GET", url + "/ready")
        assert (status, body["status"]) == (503, "draining")
        assert http("GET", url + "/health")[0] == 200  # alive: draining is no reason to restart
        assert _metric(url, "kubetune_model_ready") == 0
        late = client.completions.create(model=tiny_model_dir.name, prompt="Hi", max_tokens=3)  # still served
        assert late.choices[0].text and not server.should_exit
        server.handle_exit(signal.SIGTERM, None)  # a second signal ends the delay: stop listening, drain
        assert server.should_exit
        rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and rest[-1].usage.completion_tokens == 120
