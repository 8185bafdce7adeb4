"""`kubetune chat` and `generate` work with their defaults on the project's own 256-token models
(#17 item 10): the default number of new tokens shrinks to what the context has room for, as
`serve` does; an explicit `--max-tokens` that cannot fit is still refused (exit 2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune.trainer.cli.infer import main as infer_main

from .test_infer_helpers import capitals_data

CONTEXT = 256  # builtin:tiny-llama's max_position_embeddings

pytestmark = pytest.mark.slow  # > 1 s each: generates up to the context's length


def test_chat_defaults_fit_the_demo_models_context(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """512 new tokens by default used to exceed the context: the first message exited 2."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\n"))
    code = infer_main(["chat", str(tiny_model_dir), "--seed", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "context length" not in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\n"))
    assert infer_main(["chat", str(tiny_model_dir), "--max-tokens", "512"]) == 2  # asked for: checked
    assert "maximum context length is 256" in capsys.readouterr().err


def test_generate_defaults_fit_the_context(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gen.jsonl"
    code = infer_main(["generate", str(tiny_model_dir), "--data", str(capitals_data()), "--out", str(out),
                       "--max-samples", "2", "--quiet", "--temperature", "1", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["completion_tokens"] <= min(256, CONTEXT - row["prompt_tokens"])
