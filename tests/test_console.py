"""`kubetune console`: the Launch form's round trip and validation (fast), and the whole flow in
headless Chromium (slow): launch the quickstart from the form, watch its loss curve grow over
server-sent events, see it finish, chat with the trained model through `kubetune serve`.
The browser tests save a screenshot of each page under docs/pages/images/console/."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kubetune.operator.console import charts, form
from kubetune.operator.console.runs import LocalRuns
from kubetune.trainer.api.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "pages" / "images" / "console"
CHROMIUM = "/usr/bin/chromium"


def test_the_form_starts_from_the_quickstart_and_round_trips_it() -> None:
    here = yaml.safe_load((REPO / "operator" / "console" / "quickstart.yaml").read_text())
    assert here == yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    sections = form.sections()
    values = form.document_to_form(here, sections)
    assert values["train.learningRate"] == "0.003" and values["data.datasets[0].path"] == "examples/data/demo_alpaca.json"
    assert form.form_to_document(values, sections) == here
    assert form.form_to_document(form.document_to_form(yaml.safe_load(form.to_yaml(here)))) == here


def test_what_the_form_has_no_field_for_survives_the_round_trip() -> None:
    document = {"model": {"path": "m"}, "data": {"datasets": [{"path": "a"}, {"path": "b", "weight": 2}]},
                "pipeline": [{"stage": "sft"}, {"stage": "dpo"}]}
    assert form.form_to_document(form.document_to_form(document)) == document


def test_every_dataset_gets_fields_and_more_than_the_form_shows_is_kept() -> None:
    base = form.sections()
    document = {"model": {"path": "m"}, "data": {"datasets": [{"path": f"d{i}.jsonl", "weight": i + 1} for i in range(35)]}}
    shown = form.expand(base, form.counts_of_document(document, base))
    values = form.document_to_form(document, shown)
    assert values["data.datasets[1].path"] == "d1.jsonl" and values["data.datasets[31].weight"] == "32"
    assert "data.datasets[32].path" not in values and "d34.jsonl" in values["_extra"]  # past MAX_ITEMS
    again = form.expand(base, form.counts_of_values(values, base))
    assert form.form_to_document(values, again) == document
    added = form.counts_of_values({"data.datasets[0].path": "a"}, base, add="data.datasets")
    assert added["data.datasets"] == 2


def test_field_errors_come_from_the_validator_and_land_on_their_field() -> None:
    sections = form.sections()
    values = form.document_to_form(yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text()), sections)
    values["train.learningRate"], values["train.batchSize"], values["method"] = "-1", "many", "lora"
    spec, errors = form.check(form.form_to_document(values, sections))
    by_field, _ = form.errors_by_field(errors, sections)
    assert spec is None
    assert "greater than 0" in by_field["train.learningRate"]
    assert "valid integer" in by_field["train.batchSize"]
    assert "method" not in by_field


def test_a_run_name_from_a_url_cannot_leave_the_runs_root(tmp_path: Path) -> None:
    runs = LocalRuns(tmp_path / "runs")
    assert runs.path("quickstart") == (tmp_path / "runs" / "quickstart").resolve()
    for bad in ("..", "../etc", "a/b", "/etc", ".hidden", ""):
        with pytest.raises(SpecError):
            runs.path(bad)


def test_charts_plot_only_finite_values_of_the_key() -> None:
    records = [{"event": "start"}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.0},
               {"step": 3, "eval_loss": 1.5}]
    assert charts.series(records, "loss") == [(1.0, 2.0), (3.0, 1.0)]
    svg = charts.run_charts(records, {"loss": "Loss"})[0]
    assert 'data-series="loss" data-points="2"' in svg and 'data-series="eval_loss" data-points="1"' in svg


# ---------------------------------------------------------------- the browser flows (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _start(argv: list[str], url: str, log: Path, timeout: float = 120) -> subprocess.Popen:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONSAFEPATH": "1"})
    _wait_http(url, process, timeout, log)
    return process


@pytest.fixture(scope="module")
def console_url(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("console")
    port = _free_port()
    argv = [sys.executable, "-m", "kubetune.trainer.cli.main", "console", "--port", str(port),
            "--runs-dir", str(root / "runs")]
    process = _start(argv, f"http://127.0.0.1:{port}/jobs", root / "console.log")
    yield f"http://127.0.0.1:{port}", root / "runs"
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def _shot(page, name: str, top: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    if top:
        page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


@pytest.mark.slow
def test_an_invalid_field_shows_the_validators_message_next_to_it(console_url, page) -> None:
    url, _ = console_url
    page.goto(f"{url}/launch")
    page.fill("#f-train-learningRate", "-1")
    page.locator("#f-train-learningRate").blur()
    error = page.locator("#err-train-learningRate")
    error.wait_for(state="visible", timeout=15000)
    assert "greater than 0" in error.inner_text()
    assert page.get_attribute("#f-train-learningRate", "aria-invalid") == "true"
    page.locator("#err-train-learningRate").scroll_into_view_if_needed()
    _shot(page, "launch-invalid", top=False)
    page.fill("#f-train-learningRate", "0.003")
    page.locator("#f-train-learningRate").blur()
    page.wait_for_function("document.getElementById('err-train-learningRate').textContent.trim() === ''", timeout=15000)
    # the YAML view round-trips: edited there, applied to the form, the field shows it
    text = page.input_value("#yaml-view")
    assert "learningRate: 0.003" in text
    page.fill("#yaml-view", text.replace("learningRate: 0.003", "learningRate: 0.01"))
    page.click("#yaml-apply")
    page.wait_for_function("document.getElementById('f-train-learningRate').value === '0.01'", timeout=15000)
    assert page.input_value("#f-model-path") == "builtin:tiny-llama"


@pytest.mark.slow
def test_launch_the_quickstart_watch_its_loss_curve_and_see_it_finish(console_url, page) -> None:
    url, runs = console_url
    page.goto(f"{url}/launch")
    assert page.input_value("#f-model-path") == "builtin:tiny-llama"
    # 120 steps: long enough that the console (polling every second) sees the curve part-way on
    # a quiet machine too; 24 steps once finished between two polls and the curve never "grew".
    page.fill("#f-train-maxSteps", "120")
    page.fill("#f-logging-everySteps", "2")
    page.locator("#f-logging-everySteps").blur()
    page.wait_for_function("document.getElementById('yaml-view').value.includes('maxSteps: 120')", timeout=15000)
    assert page.locator("#estimate-total").count() == 1  # the live estimate table of a valid spec
    _shot(page, "launch")
    page.click("#run-button")
    page.wait_for_url(f"{url}/runs/quickstart", timeout=30000)
    # the curve grows while the run trains: two different point counts seen over SSE
    points = page.locator('#charts polyline[data-series="loss"]')
    points.wait_for(timeout=240000)
    first = int(points.get_attribute("data-points"))
    page.wait_for_function(
        f"(() => {{ const p = document.querySelector('#charts polyline[data-series=\"loss\"]');"
        f" return p && Number(p.dataset.points) > {first}; }})()", timeout=240000)
    page.wait_for_function("document.getElementById('phase').textContent.trim() === 'Succeeded'", timeout=300000)
    assert int(page.locator('#charts polyline[data-series="loss"]').get_attribute("data-points")) >= 10
    assert "kubetune" in page.inner_text("#run-log")  # the run's own log, streamed with the curves
    _shot(page, "run")
    assert (runs / "quickstart" / "model.safetensors").exists()
    page.goto(f"{url}/jobs")
    row = page.locator('tr[data-name="quickstart"]')
    assert row.get_attribute("data-phase") == "Succeeded"
    _shot(page, "jobs")
    page.goto(f"{url}/compare?run=quickstart")
    assert page.locator('#compare-charts polyline[data-series="quickstart"]').count() >= 1
    _shot(page, "compare")


@pytest.mark.slow
def test_the_playground_streams_an_answer_from_the_served_model(console_url, page, tmp_path) -> None:
    url, runs = console_url
    model = runs / "quickstart"
    if not (model / "model.safetensors").exists():
        pytest.fail("needs the run trained by the launch test (run the module, not this test alone)")
    port = _free_port()
    argv = [sys.executable, "-m", "kubetune.trainer.cli.main", "serve", str(model), "--engine", "transformers",
            "--served-model-name", "quickstart", "--port", str(port), "--host", "127.0.0.1"]
    server = _start(argv, f"http://127.0.0.1:{port}/v1/models", tmp_path / "serve.log", timeout=180)
    try:
        page.goto(f"{url}/playground")
        page.fill("#p-endpoint", f"http://127.0.0.1:{port}")
        page.locator("#p-endpoint").blur()
        page.wait_for_function("document.querySelectorAll('#p-model-list option').length > 0", timeout=15000)
        page.fill("#p-model", "quickstart")
        page.fill("#p-max", "16")
        page.fill("#p-message", "Capital of Norway?")
        page.click("#p-send")
        page.wait_for_function("document.getElementById('answer').dataset.state === 'done'", timeout=120000)
        answer = page.locator("#answer")
        assert answer.inner_text().strip() and not answer.inner_text().startswith("[error")
        assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces, not at once
        _shot(page, "playground")
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_a_token_is_required_off_loopback_and_checked(tmp_path) -> None:
    port = _free_port()
    base = [sys.executable, "-m", "kubetune.trainer.cli.main", "console", "--runs-dir", str(tmp_path / "runs")]
    refused = subprocess.run([*base, "--host", "0.0.0.0", "--port", str(port)], capture_output=True, text=True,
                             timeout=60, cwd=REPO, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert refused.returncode == 2 and "--token" in refused.stderr
    process = _start([*base, "--port", str(port), "--token", "s3cret"], f"http://127.0.0.1:{port}/jobs?token=s3cret",
                     tmp_path / "console.log")
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs", timeout=5)
        assert denied.value.code == 401
        request = urllib.request.Request(f"http://127.0.0.1:{port}/jobs", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        # a body announced over the bound is refused before it is read
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.putrequest("POST", "/launch/check")
        connection.putheader("Authorization", "Bearer s3cret")
        connection.putheader("Content-Length", str(2 * 1024 * 1024))
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
    finally:
        process.terminate()
        process.wait(30)
