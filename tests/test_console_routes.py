"""Every route of `kubetune console`, through FastAPI's TestClient (in-process, no browser, no
server): status codes, the request-size bound and the token, bad input answered with its
message, the server-sent event stream's framing, the playground's relay to an OpenAI-compatible
endpoint (a small local one), and Apply against a stand-in cluster object that records what the
console sends (the real API server's answers are in tests/test_console_cluster.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml

pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (kubetune[dev])")
from fastapi.testclient import TestClient

from kubetune.operator.console import form
from kubetune.operator.console.app import MAX_BODY, ConsoleConfig, create_app
from kubetune.operator.console.cluster import row_of
from tests.storage_fixtures import *  # noqa: F403 (the s3 fixture)

REPO = Path(__file__).resolve().parents[1]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class FakeCluster:
    """The `cluster.Cluster` interface, recording what the console asks of it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.created: list[tuple[dict[str, Any], str]] = []
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.fail = fail
        self.users: list[tuple[str, tuple[str, ...]]] = []

    def rows(self, namespace: str | None = None):
        if self.fail:
            raise self.fail
        return [row_of(o) for (ns, _, _), o in self.objects.items() if namespace in (None, ns)]

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any]:
        return self.objects[(namespace, kind, name)]

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [{"type": "Normal", "reason": "Created", "message": f"job {name} created", "count": 1, "last": ""}]

    def pod_logs(self, namespace: str, kind: str, name: str) -> dict[str, str]:
        return {f"{name}-0": "step 1 loss 2.0"}

    def as_user(self, user: str, groups: tuple[str, ...] = ()) -> FakeCluster:
        self.users.append((user, groups))
        return self

    def create(self, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        self.created.append((manifest, namespace))
        self.objects[(namespace, manifest["kind"], manifest["metadata"]["name"])] = {
            **manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
        return manifest


def _client(tmp_path: Path, **config: Any) -> TestClient:
    app = create_app(ConsoleConfig(runs_dir=tmp_path / "runs", poll_s=0.02, **config))
    return TestClient(app, follow_redirects=False)


@pytest.fixture
def client(tmp_path: Path):
    with _client(tmp_path) as c:
        yield c


def _quickstart_form() -> dict[str, str]:
    document = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    return {**form.document_to_form(document), "_nodes": "1", "_gpusPerNode": "1"}


def _post(client: TestClient, path: str, values: dict[str, str], **headers: str):
    return client.post(path, content=urlencode(values), headers={**FORM, **headers})


def _run_dir(tmp_path: Path, name: str, phase: str, steps: int) -> Path:
    directory = tmp_path / "runs" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) + "\n"
                                                     for s in range(1, steps + 1)))
    (directory / "status.json").write_text(json.dumps({"phase": phase, "step": steps, "totalSteps": 10, "loss": 2.5}))
    (directory / "kubetune-console.log").write_text("kubetune train: <step> one\nline two\n")
    return directory


# ---------------------------------------------------------------- pages and navigation


def test_pages_answer_and_unknown_things_are_404(client: TestClient) -> None:
    assert client.get("/").status_code == 307 and client.get("/").headers["location"] == "/jobs"
    for path in ("/jobs", "/launch", "/compare", "/playground", "/static/console.js"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["x-content-type-options"] == "nosniff"
    assert 'id="run-button"' in client.get("/launch").text
    assert 'id="apply-button"' not in client.get("/launch").text  # no cluster, no Apply
    assert client.get("/runs/nothing-here").status_code == 404
    assert client.get("/cluster/default/FineTuneJob/x").status_code == 404  # local mode: no cluster pages
    assert client.get("/no-such-page").status_code == 404
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_a_bad_run_name_is_refused_with_its_message(client: TestClient) -> None:
    for bad in ("..hidden", "UPPER", "a%2Fb"):
        response = client.get(f"/runs/{bad}")
        assert response.status_code in (400, 404), bad
    response = client.get("/runs/.x/events")
    assert response.status_code == 400 and "is not a run name" in response.text


def test_language_cookie_and_no_open_redirect(client: TestClient) -> None:
    response = client.get("/lang/zh", params={"next": "/launch"})
    assert response.status_code == 307 and response.headers["location"] == "/launch"
    assert "lang=zh" in response.headers["set-cookie"]
    assert "任务" in client.get("/jobs", cookies={"lang": "zh"}).text
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        assert client.get("/lang/en", params={"next": target}).headers["location"] == "/jobs"
    assert "lang=en" in client.get("/lang/xx").headers["set-cookie"]  # an unknown language falls back


def test_jobs_table_partial_and_filters(client: TestClient, tmp_path: Path) -> None:
    _run_dir(tmp_path, "done-run", "Succeeded", 4)
    _run_dir(tmp_path, "busy-run", "Running", 2)
    page = client.get("/jobs")
    assert "<html" in page.text and 'data-name="done-run"' in page.text and 'data-name="busy-run"' in page.text
    partial = client.get("/jobs", params={"phase": "Running"}, headers={"HX-Request": "true"})
    assert "<html" not in partial.text
    assert 'data-name="busy-run"' in partial.text and 'data-name="done-run"' not in partial.text


def test_run_page_and_compare(client: TestClient, tmp_path: Path) -> None:
    _run_dir(tmp_path, "one", "Succeeded", 5)
    _run_dir(tmp_path, "two", "Succeeded", 3)
    page = client.get("/runs/one")
    assert page.status_code == 200
    assert 'data-series="loss" data-points="5"' in page.text
    assert "&lt;step&gt;" in page.text and "<step>" not in page.text  # the log is escaped
    compare = client.get("/compare", params=[("run", "one"), ("run", "two"), ("run", "../etc")])
    assert compare.status_code == 200
    assert 'data-series="one"' in compare.text and 'data-series="two"' in compare.text
    assert "../etc" not in compare.text.split('id="compare-charts"')[1]


# ---------------------------------------------------------------- guard: token and size bound


def test_request_bodies_over_the_bound_are_413(client: TestClient) -> None:
    response = client.post("/launch/check", content=b"x" * (MAX_BODY + 1), headers=FORM)
    assert response.status_code == 413 and str(MAX_BODY) in response.json()["detail"]

    def chunks():
        yield b"a=1"

    response = client.post("/launch/check", content=chunks(), headers=FORM)  # no length: refused
    assert response.status_code == 413
    assert _post(client, "/launch/check", {"name": "x" * 1000}).status_code == 200  # under the bound


def test_the_token_is_required_and_then_kept_in_a_cookie(tmp_path: Path) -> None:
    with _client(tmp_path, token="s3cret") as c:
        denied = c.get("/jobs")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert c.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/static/console.js").status_code == 401
        assert c.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        first = c.get("/jobs", params={"token": "s3cret"})
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert c.get("/launch").status_code == 200  # the cookie now carries it


# ---------------------------------------------------------------- launch


def test_check_puts_the_validators_messages_on_their_fields(client: TestClient) -> None:
    values = _quickstart_form()
    ok = _post(client, "/launch/check", values)
    assert ok.status_code == 200 and 'id="estimate-total"' in ok.text and "learningRate: 0.003" in ok.text
    values["train.learningRate"] = "-1"
    bad = _post(client, "/launch/check", values)
    assert bad.status_code == 200
    error = bad.text.split('id="err-train-learningRate"', 1)[1].split("</p>", 1)[0]
    assert "greater than 0" in error
    assert 'hx-swap-oob="true"' in bad.text  # each message replaces its field's paragraph


def test_yaml_to_form_and_bad_yaml(client: TestClient) -> None:
    text = (REPO / "examples" / "quickstart.yaml").read_text().replace("learningRate: 0.003", "learningRate: 0.01")
    good = _post(client, "/launch/yaml", {"_yaml": text, "_nodes": "2", "_gpusPerNode": "8"})
    assert good.status_code == 200 and 'value="0.01"' in good.text
    assert 'id="f-data-datasets-0-path"' in good.text
    bad = _post(client, "/launch/yaml", {"_yaml": "model: [unclosed"})
    assert bad.status_code == 200 and "is not valid YAML" in bad.text
    listed = _post(client, "/launch/yaml", {"_yaml": "- a\n- b\n"})
    assert "is not a mapping of training settings" in listed.text


def test_run_starts_only_a_valid_spec(client: TestClient) -> None:
    started: list[dict[str, Any]] = []
    client.app.state.console.runs.launch = lambda document: started.append(document) or "quickstart"
    values = _quickstart_form()
    invalid = {**values, "train.batchSize": "many"}
    refused = _post(client, "/launch/run", invalid)
    assert refused.status_code == 200 and "valid integer" in refused.text and not started
    accepted = _post(client, "/launch/run", values)
    assert accepted.status_code == 204 and accepted.headers["hx-redirect"] == "/runs/quickstart"
    assert started == [yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())]


def test_apply_needs_a_cluster_and_a_spec_the_operator_admits(tmp_path: Path) -> None:
    with _client(tmp_path) as local:
        assert _post(local, "/launch/apply", _quickstart_form()).status_code == 200  # shown, nothing applied
    cluster = FakeCluster()
    with _client(tmp_path, cluster=cluster, namespace="team-a") as c:
        assert 'id="apply-button"' in c.get("/launch").text
        values = _quickstart_form()
        refused = _post(c, "/launch/apply", values)  # a local dataset path: the operator's admission refuses it
        error = refused.text.split('id="err-data-datasets-0-path"', 1)[1].split("</p>", 1)[0]
        assert "local path" in error and not cluster.created
        values.update({"data.datasets[0].path": "s3://demo/a.json", "output.path": "s3://demo/out", "name": "My Job"})
        applied = _post(c, "/launch/apply", {**values, "_nodes": "2", "_gpusPerNode": "4"})
        assert applied.status_code == 204, applied.text
        assert applied.headers["hx-redirect"] == "/cluster/team-a/FineTuneJob/my-job"
        (manifest, namespace), = cluster.created
        assert namespace == "team-a" and manifest["metadata"] == {"name": "my-job", "namespace": "team-a"}
        assert manifest["spec"]["nodes"] == 2 and manifest["spec"]["gpusPerNode"] == 4
        assert manifest["spec"]["training"]["data"]["datasets"][0]["path"] == "s3://demo/a.json"
        page = c.get("/cluster/team-a/FineTuneJob/my-job")
        assert page.status_code == 200 and "job my-job created" in page.text and "step 1 loss 2.0" in page.text
        assert c.get("/cluster/team-a/Secret/x").status_code == 404
        rows = c.get("/jobs", params={"namespace": "team-a"}).text
        assert 'data-name="my-job"' in rows


def test_the_api_servers_refusal_is_shown_not_raised(tmp_path: Path) -> None:
    class Forbidden(Exception):
        reason, body = "Forbidden", 'finetunejobs.kubetune.io is forbidden: User "bob" cannot create'

    with _client(tmp_path, cluster=FakeCluster(fail=Forbidden())) as c:
        values = {**_quickstart_form(), "data.datasets[0].path": "s3://d/a.json", "output.path": "s3://d/o"}
        response = _post(c, "/launch/apply", values)
        assert response.status_code == 200 and "User &#34;bob&#34; cannot create" in response.text  # escaped
        jobs = c.get("/jobs")
        assert jobs.status_code == 200 and "Forbidden" in jobs.text


# ---------------------------------------------------------------- server-sent events


def _events(text: str) -> list[tuple[str, str]]:
    """(event, data) of an SSE stream, checking its framing: blocks split by a blank line, one
    `event:` line, then `data:` lines whose contents join with newlines."""
    out = []
    assert text.endswith("\n\n"), text[-80:]
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1:], block
        assert all(line.startswith("data: ") or line == "data:" for line in lines[1:]), block
        out.append((lines[0][7:], "\n".join(line[6:] for line in lines[1:])))
    return out


def test_events_stream_updates_then_done(client: TestClient, tmp_path: Path) -> None:
    directory = _run_dir(tmp_path, "live", "Running", 2)

    def finish() -> None:
        time.sleep(0.4)
        with (directory / "metrics.jsonl").open("a") as metrics:
            metrics.write(json.dumps({"step": 3, "loss": 2.0}) + "\n" + json.dumps({"step": 4, "loss": 1.8}) + "\n")
        time.sleep(0.1)
        (directory / "status.json").write_text(json.dumps({"phase": "Succeeded", "step": 4, "totalSteps": 4}))

    writer = threading.Thread(target=finish)
    writer.start()
    response = client.get("/runs/live/events")
    writer.join()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = _events(response.text)
    names = [e for e, _ in events]
    assert names[:3] == ["status", "charts", "log"] and names[-1] == "done" and names.count("done") == 1
    charts = [d for e, d in events if e == "charts"]
    assert 'data-series="loss" data-points="2"' in charts[0] and 'data-series="loss" data-points="4"' in charts[-1]
    assert json.loads(events[-1][1]) == {"phase": "Succeeded"}
    log = next(d for e, d in events if e == "log")
    assert log == "kubetune train: &lt;step&gt; one\nline two"  # multi-line data, escaped


# ---------------------------------------------------------------- playground relay


class _OpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible endpoint: /v1/models and a streamed chat completion that
    echoes what it was asked."""

    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "base"}, {"id": "adapter-<1>"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _OpenAI.seen.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ("Oslo", " is", " the capital."):
            chunk = {"choices": [{"delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b": a comment line\n\ndata: [DONE]\n\n")


@pytest.fixture
def openai_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _OpenAI.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_playground_lists_models_and_relays_a_streamed_chat(client: TestClient, openai_endpoint: str) -> None:
    options = client.get("/playground/models", params={"endpoint": openai_endpoint + "/v1"})
    assert options.text == '<option value="base">base</option><option value="adapter-&lt;1&gt;">adapter-&lt;1&gt;</option>'
    answer = _post(client, "/playground/chat", {"endpoint": openai_endpoint, "model": "adapter-1", "message": "Capital?",
                                                 "system": "Be brief.", "temperature": "0.5", "max_tokens": "999999"})
    assert answer.status_code == 200 and answer.text == "Oslo is the capital."
    (sent,) = _OpenAI.seen
    assert sent["model"] == "adapter-1" and sent["stream"] is True and sent["temperature"] == 0.5
    assert sent["max_tokens"] == 4096  # capped
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]


def test_playground_refuses_non_http_endpoints_and_reports_unreachable_ones(client: TestClient) -> None:
    for endpoint in ("file:///etc/passwd", "ftp://x", ""):
        assert _post(client, "/playground/chat", {"endpoint": endpoint, "message": "hi"}).status_code == 400
        assert client.get("/playground/models", params={"endpoint": endpoint}).text == '<option value="">(ValueError)</option>'
    unreachable = _post(client, "/playground/chat", {"endpoint": "http://127.0.0.1:9", "message": "hi"})
    assert unreachable.status_code == 200 and unreachable.text.startswith("[error: cannot reach")


# ---------------------------------------------------------------- more than one dataset, InferenceService


def test_a_list_grows_by_the_add_button_and_from_yaml(client: TestClient) -> None:
    values = _quickstart_form()
    grown = _post(client, "/launch/add", {**values, "_add": "data.datasets"})
    assert grown.status_code == 200
    assert 'id="f-data-datasets-1-path"' in grown.text and 'id="f-data-datasets-2-path"' not in grown.text
    two = _post(client, "/launch/check", {**values, "data.datasets[1].path": "examples/data/demo_alpaca.json",
                                          "data.datasets[1].weight": "2"})
    assert "weight: 2" in two.text and two.text.count("- path: examples/data/demo_alpaca.json") == 2
    text = (REPO / "examples" / "quickstart.yaml").read_text().replace(
        "      format: alpaca\n", "      format: alpaca\n    - path: b.jsonl\n    - path: c.jsonl\n")
    from_yaml = _post(client, "/launch/yaml", {"_yaml": text})
    assert 'name="data.datasets[2].path" value="c.jsonl"' in from_yaml.text


def test_an_inferenceservice_from_its_own_schema_checked_and_applied(tmp_path: Path) -> None:
    cluster = FakeCluster()
    with _client(tmp_path, cluster=cluster) as c:
        page = c.get("/launch", params={"kind": "InferenceService"})
        assert page.status_code == 200
        assert 'id="f-model-uri"' in page.text and 'id="f-minReplicas"' in page.text and 'id="f-adapters-0-name"' in page.text
        assert 'id="f-train-learningRate"' not in page.text and 'id="run-button"' not in page.text
        values = {"_kind": "InferenceService", "_name": "Chat Bot", "model.uri": "s3://m/base", "model.name": "chat",
                  "engine": "transformers", "gpus": "-1", "adapters[0].name": "sft", "adapters[0].uri": "s3://m/sft"}
        bad = _post(c, "/launch/check", values)
        assert "greater than or equal to 0" in bad.text.split('id="err-gpus"', 1)[1].split("</p>", 1)[0]
        assert _post(c, "/launch/run", {**values, "gpus": "0"}).status_code == 404  # nothing local to run
        applied = _post(c, "/launch/apply", {**values, "gpus": "0"})
        assert applied.status_code == 204 and applied.headers["hx-redirect"] == "/cluster/default/InferenceService/chat-bot"
        (manifest, _), = cluster.created
        assert manifest["kind"] == "InferenceService" and manifest["metadata"]["name"] == "chat-bot"
        assert manifest["spec"] == {"model": {"uri": "s3://m/base", "name": "chat"}, "engine": "transformers",
                                    "gpus": 0, "adapters": [{"uri": "s3://m/sft", "name": "sft"}]}
        as_yaml = _post(c, "/launch/yaml", {"_kind": "InferenceService", "_name": "x",
                                             "_yaml": (REPO / "examples" / "inferenceservice.yaml").read_text()})
        assert 'value="support-assistant-sft"' in as_yaml.text  # a manifest's spec fills the form


def test_an_inferenceservice_shows_whether_its_model_starts(client: TestClient) -> None:
    """The Launch page's estimate for a service: weights, activations and KV cache per GPU, and
    the admission check's refusal (with what would start) before anything is applied."""
    values = {"_kind": "InferenceService", "_name": "chat", "model.uri": "s3://models/Llama-3.1-8B-Instruct",
              "gpus": "1"}
    unsized = _post(client, "/launch/check", values)
    assert "Set gpuMemoryGiB" in unsized.text and 'id="estimate-total"' not in unsized.text
    refused = _post(client, "/launch/check", {**values, "gpuMemoryGiB": "24"})
    assert 'id="estimate-total"' in refused.text and 'id="estimate-verdict"' in refused.text
    assert "KV cache (36,795 tokens)" in refused.text and "engineArgs.maxModelLen: 35840" in refused.text
    fits = _post(client, "/launch/check", {**values, "gpuMemoryGiB": "24", "engineArgs.maxModelLen": "8192"})
    assert 'id="estimate-total"' in fits.text and 'id="estimate-verdict"' not in fits.text
    assert "engineArgs.maxModelLen: 35840" not in fits.text and "maxModelLen 8,192" in fits.text


# ---------------------------------------------------------------- a console in a pod: health, cluster only, impersonation


def test_health_needs_no_token_and_no_local_runs_means_none(tmp_path: Path) -> None:
    with _client(tmp_path, token="s3cret", local_runs=False, cluster=FakeCluster()) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.text == "ok"
        auth = {"Authorization": "Bearer s3cret"}
        assert 'id="run-button"' not in c.get("/launch", headers=auth).text
        assert _post(c, "/launch/run", _quickstart_form(), **auth).status_code == 404
        assert c.get("/runs/anything", headers=auth).status_code == 400
        assert 'href="/compare"' not in c.get("/jobs", headers=auth).text
    assert not (tmp_path / "runs").exists()  # a read-only pod: nothing written


def test_impersonation_takes_the_user_from_the_proxys_header_or_refuses(tmp_path: Path) -> None:
    cluster = FakeCluster()
    with _client(tmp_path, cluster=cluster, user_header="X-Forwarded-User") as c:
        refused = c.get("/jobs")
        assert refused.status_code == 401 and "X-Forwarded-User" in refused.json()["detail"]
        assert c.get("/healthz").status_code == 200 and c.get("/static/console.css").status_code == 200
        page = c.get("/jobs", headers={"X-Forwarded-User": "alice", "X-Forwarded-Groups": "ml-team, ,admins"})
        assert page.status_code == 200 and 'id="user"' in page.text and ">alice<" in page.text
        assert cluster.users == [("alice", ("ml-team", "admins"))]
        values = {**_quickstart_form(), "data.datasets[0].path": "s3://d/a.json", "output.path": "s3://d/o"}
        assert _post(c, "/launch/apply", values, **{"X-Forwarded-User": "bob"}).status_code == 204
        assert cluster.users[-1] == ("bob", ())


def test_impersonating_clients_send_one_group_header_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the API server reads: Impersonate-User once, Impersonate-Group once per group (the
    kubernetes client alone would send one header per name). Clients are kept per user, a few."""
    from kubernetes import client

    from kubetune.operator.console import cluster as cluster_module

    seen: list[tuple[list[str], list[str]]] = []

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.headers.get_all("Impersonate-User") or [], self.headers.get_all("Impersonate-Group") or []))
            body = b'{"items": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        base = cluster_module.Cluster(api=client.ApiClient(configuration))
        alice = base.as_user("alice", ("ml-team", "system:authenticated"))
        alice.rows("team-a")
        assert seen[0] == (["alice"], ["ml-team", "system:authenticated"])
        base.rows("team-a")
        assert seen[-1] == ([], [])  # the console's own identity is untouched
        monkeypatch.setattr(cluster_module, "USERS_KEPT", 2)
        assert base.as_user("alice", ("ml-team", "system:authenticated")) is alice
        base.as_user("bob")
        base.as_user("carol")  # the oldest (alice) goes
        assert base.as_user("alice", ("ml-team", "system:authenticated")) is not alice
    finally:
        server.shutdown()


# ---------------------------------------------------------------- a cluster job's curves from its S3 output


def _s3_job(s3: Any, output: str) -> dict[str, Any]:
    settings = s3.settings()
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "remote", "namespace": "team-a"}, "status": {"phase": "Running"},
            "spec": {"training": {"model": {"path": "builtin:tiny-llama"}, "output": {"path": output},
                                  "storage": {"endpointUrl": settings.endpointUrl, "pathStyle": True, "maxAttempts": 1}}}}


def test_a_cluster_jobs_curves_come_from_its_s3_output(tmp_path: Path, s3: Any) -> None:
    """The job page draws the curves from metrics.jsonl under the s3:// output (only its tail is
    read: a partial first line is dropped, the newest records are all there), polls while the
    job runs, and says why there are none for a job without a log yet or with a volume output."""
    from kubetune.operator.console import remote

    cluster = FakeCluster()
    cluster.objects[("team-a", "FineTuneJob", "remote")] = _s3_job(s3, s3.uri("runs/remote"))
    cluster.objects[("team-a", "FineTuneJob", "pvc")] = {**_s3_job(s3, "/data/out"), "metadata": {
        "name": "pvc", "namespace": "team-a"}}
    with _client(tmp_path, cluster=cluster) as c:
        waiting = c.get("/cluster/team-a/FineTuneJob/remote")
        assert waiting.status_code == 200 and "No metrics.jsonl under" in waiting.text
        assert 'hx-get="/cluster/team-a/FineTuneJob/remote/charts"' in waiting.text  # running: it polls

        lines = [json.dumps({"step": s, "loss": 5.0 - s / 1000, "lr": 1e-4, "pad": "x" * 200}) for s in range(1, 6001)]
        s3.put("runs/remote/metrics.jsonl", "\n".join(lines) + "\n")
        assert len("\n".join(lines)) > remote.TAIL_BYTES  # a ranged read, starting mid-line
        charts = c.get("/cluster/team-a/FineTuneJob/remote/charts")
        assert charts.status_code == 200
        shown = int(charts.text.split('data-series="loss" data-points="')[1].split('"')[0])
        assert 3000 < shown < 6000  # the last MiB of the file, whole records only
        records, why = remote.job_metrics(cluster.objects[("team-a", "FineTuneJob", "remote")])
        assert why is None and records[-1]["step"] == 6000 and records[0]["step"] == 6000 - len(records) + 1

        volume = c.get("/cluster/team-a/FineTuneJob/pvc")
        assert "s3:// output" in volume.text and 'data-series="loss"' not in volume.text
        assert c.get("/cluster/team-a/InferenceService/remote/charts").status_code == 404
