"""The tokenized-dataset cache (issue 7, item 4): `kubetune prepare` tokenizes once, training
reads the entry instead of tokenizing, the key follows everything that changes the token rows,
and an incomplete entry is never used. Locally and in S3 (moto)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.artifacts.datacache import cache_location, prepare_skip_reason
from kubetune.trainer.train.data import build_datasets
from kubetune.trainer.train.data import pipeline as pipeline_module
from kubetune.trainer.train.data.cache import MARKER, TokenizedCache, cache_key
from kubetune.trainer.train.prepare import prepare
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

datasets.disable_progress_bars()

ROWS = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
    for w in ("apple", "river", "stone", "cloud", "lemon", "tiger", "piano", "maple", "ocean", "amber") * 3
]


def write_data(path: Path, rows: list[dict[str, Any]] = ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_of(data_path: Path | str, cache: str, **data: Any) -> TrainingSpec:
    extra = data.pop("extra", {})
    return validate_training({
        "name": "cache-test",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": str(data_path), "format": "alpaca"}], "maxLength": 48, "evalSize": 4,
                 "cache": cache, **data},
        **extra,
    })


@pytest.fixture
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def no_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any tokenization from here on fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized although the cache holds the rows")

    monkeypatch.setattr(pipeline_module, "tokenize", refuse)


def rows(ds: datasets.Dataset | None) -> list[dict[str, Any]]:
    return [] if ds is None else ds.to_list()


@pytest.mark.slow  # trains a model
def test_prepare_then_train_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from kubetune.trainer.cli.main import main
    from kubetune.trainer.train.runner import run

    data = write_data(tmp_path / "data" / "train.jsonl")
    cache = tmp_path / "cache"
    document = {
        "name": "cache-run",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": str(data), "format": "alpaca"}], "maxLength": 48, "evalSize": 4,
                 "cache": str(cache)},
        "method": "full",
        "train": {"maxSteps": 1, "batchSize": 4},
        "logging": {"samples": 0},
        "output": {"path": str(tmp_path / "out")},
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(document))

    # `kubetune prepare` (the entry-point plugin) tokenizes once; a second run does nothing.
    assert main(["prepare", str(spec_file)]) == 0
    entries = list((cache / "datasets").iterdir())
    assert len(entries) == 1 and (entries[0] / MARKER).is_file()
    marker = json.loads((entries[0] / MARKER).read_text())
    stamp = (entries[0] / MARKER).stat().st_mtime_ns
    assert main(["prepare", str(spec_file)]) == 0
    assert (entries[0] / MARKER).stat().st_mtime_ns == stamp

    # Training: the processor never runs, the stats are the prepared ones.
    no_tokenizing(monkeypatch)
    caplog.set_level(logging.INFO, logger="kubetune.data.cache")
    result = run(validate_training(document))
    assert result.global_step == 1
    assert any("cache hit" in r.getMessage() for r in caplog.records)
    start = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["data"] == marker["stats"]
    assert marker["stats"]["train"]["examples"] == len(ROWS) - 4


def test_cached_rows_and_stats_equal_tokenizing(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_of(write_data(tmp_path / "d.jsonl"), str(tmp_path / "cache"), packing=True)
    fresh = build_datasets(spec.model_copy(update={"data": spec.data.model_copy(update={"cache": None})}), tok)
    prepared = prepare(spec)
    assert not prepared.hit and prepared.location and Path(prepared.location).is_dir()
    assert prepare(spec).hit  # idempotent
    no_tokenizing(monkeypatch)
    cached = build_datasets(spec, tok)
    assert cached.stats == fresh.stats
    assert rows(cached.train) == rows(fresh.train) and rows(cached.eval) == rows(fresh.eval)
    assert "position_ids" in cached.train.column_names  # packed sft rows, as tokenized


def test_the_key_follows_what_changes_the_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    data = write_data(tmp_path / "d.jsonl")

    def key(spec: TrainingSpec, added: list[str] | None = None) -> str | None:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        from kubetune.trainer.train.data import apply_template

        apply_template(tokenizer, spec.data.template)
        if added:
            tokenizer.add_tokens(added)
        return cache_key(spec, tokenizer)

    cache = str(tmp_path / "cache")
    base = key(spec_of(data, cache))
    assert base is not None and base == key(spec_of(data, cache))
    assert key(spec_of(data, cache, numProc=2)) == base  # worker count: same rows
    assert key(spec_of(data, cache, maxLength=64)) != base
    assert key(spec_of(data, cache, template="chatml")) != base
    assert key(spec_of(data, cache, maskPrompt=False)) != base
    assert key(spec_of(data, cache, packing=True)) != base
    assert key(spec_of(data, cache, extra={"train": {"seed": 7}})) != base  # shuffle and eval split
    assert key(spec_of(data, cache), added=["<extra_token>"]) != base  # vocabulary extension
    assert key(spec_of(data, cache, extra={"stage": "pt"})) != base
    copy = write_data(tmp_path / "elsewhere" / "d.jsonl")
    assert key(spec_of(copy, cache)) == base  # same content, another path: reusable
    write_data(data, ROWS[:-1])
    assert key(spec_of(data, cache)) != base  # changed content


def test_an_incomplete_entry_is_never_used(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_of(write_data(tmp_path / "d.jsonl"), str(tmp_path / "cache"))
    entry = Path(prepare(spec).location or "")
    marker = entry / MARKER
    text = marker.read_text()

    marker.unlink()  # as if the writer died before the marker
    caplog.set_level(logging.WARNING, logger="kubetune.data.cache")
    assert build_datasets(spec, tok).stats["train"]["examples"] == len(ROWS) - 4  # tokenized itself
    assert any("no complete cache entry" in r.getMessage() for r in caplog.records)

    marker.write_text(text)
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # a listed file cut short
    assert TokenizedCache(str(tmp_path / "cache")).lookup(json.loads(text)["key"]) is None
    result = prepare(spec)  # prepare replaces the broken entry
    assert not result.hit and Path(result.location or "") == entry
    no_tokenizing(monkeypatch)
    assert len(build_datasets(spec, tok).train) == len(ROWS) - 4


def test_cache_locations_and_when_the_operator_prepares(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    auto = spec_of(data, "auto", extra={"output": {"path": "s3://outs/runs/a"}})
    assert cache_location(auto) == "s3://outs/kubetune-cache/"
    assert prepare_skip_reason(auto) is None
    local = spec_of(data, "auto", extra={"storage": {"cacheDir": str(tmp_path / "c")}})
    assert cache_location(local) == str(tmp_path / "c" / "datasets")
    assert "local directory" in (prepare_skip_reason(local) or "")
    unset = validate_training({"model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": str(data)}]}})
    assert prepare_skip_reason(unset) == "data.cache is not set"
    streaming = spec_of(data, "s3://cache-bucket/cache/", streaming=True, evalSize=0, extra={"train": {"maxSteps": 2}})
    assert "streamed" in (prepare_skip_reason(streaming) or "")


@pytest.mark.slow  # > 1 s
def test_s3_cache_prepared_once_and_read_on_a_fresh_disk(s3: S3Env, tmp_path: Path, tok: Any, tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s3.put("data/train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    s3.upload_tree(tiny_model_dir, "models/tiny")
    document = {
        "model": {"path": s3.uri("models/tiny")},
        "data": {"datasets": [{"path": s3.uri("data/train.jsonl"), "format": "alpaca"}], "maxLength": 48,
                 "evalSize": 4, "cache": s3.uri("kubetune-cache/")},
        "storage": s3.settings(cacheDir=str(tmp_path / "prepare-disk")).model_dump(mode="json"),
    }
    spec = validate_training(document)
    result = prepare(spec)
    assert result.location and result.location.startswith(s3.uri("kubetune-cache/datasets/"))
    prefix = result.location[len(s3.uri()):]
    keys = s3.keys(prefix)
    assert prefix + MARKER in keys and any(k.endswith(".arrow") for k in keys)
    puts = [r.path for r in s3.proxy.requests if r.method == "PUT" and prefix in r.path]
    assert puts[-1].endswith(MARKER)  # the completion marker is written last
    assert s3.proxy.count("GET", "/models/tiny/tokenizer.json", objects_only=True) == 1
    assert s3.proxy.count("GET", "/models/tiny/model.safetensors", objects_only=True) == 0  # no weights

    # A second prepare finds it: nothing uploaded.
    s3.proxy.reset()
    assert prepare(spec).hit
    assert not [r for r in s3.proxy.requests if r.method in ("PUT", "POST")]

    # A training rank on a fresh disk: downloads the entry, tokenizes nothing, does not even
    # download the raw data.
    fresh = validate_training({**document, "storage": s3.settings(cacheDir=str(tmp_path / "rank-disk")).model_dump(mode="json")})
    s3.proxy.reset()
    no_tokenizing(monkeypatch)
    bundle = build_datasets(fresh, tok)
    assert len(bundle.train) == len(ROWS) - 4 and bundle.eval is not None and len(bundle.eval) == 4
    assert bundle.stats == result.stats
    assert s3.proxy.count("GET", "/data/train.jsonl", objects_only=True) == 0

    # Without its marker (an upload cut short) the entry does not count.
    s3.client.delete_object(Bucket=s3.bucket, Key=prefix + MARKER)
    monkeypatch.undo()
    other = validate_training({**document, "storage": s3.settings(cacheDir=str(tmp_path / "disk-3")).model_dump(mode="json")})
    assert TokenizedCache(other.data.cache or "", other.storage).lookup(result.key or "") is None
    assert len(build_datasets(other, tok).train) == len(ROWS) - 4  # tokenized itself


def test_a_malformed_s3_cache_is_refused_with_the_spec() -> None:
    from kubetune.trainer.api.errors import SpecErrors

    with pytest.raises(SpecErrors, match=r"data: cache: 's3://Bad_Bucket/x' has no valid bucket name"):
        validate_training({"model": {"path": "builtin:tiny-llama"},
                           "data": {"datasets": [{"path": "d.jsonl"}], "cache": "s3://Bad_Bucket/x"}})


def test_a_cache_hit_renders_with_the_template_the_entry_was_tokenized_with(tmp_path: Path, tok: Any,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """LMFlow text2text picks `plain` from the data (#17 item 1): a run reading the prepared entry
    installs it too, so the saved model prompts the way it was trained."""
    from kubetune.trainer.train.data.templates import TEMPLATES

    data = tmp_path / "t2t.json"
    data.write_text(json.dumps({"type": "text2text", "instances": [{"input": "Opposite of hot?", "output": " cold"}] * 4}))
    spec = validate_training({"model": {"path": "builtin:tiny-llama"},
                              "data": {"datasets": [{"path": str(data)}], "cache": str(tmp_path / "cache")}})
    prepare(spec)
    no_tokenizing(monkeypatch)
    cached = build_datasets(spec, tok)
    assert cached.stats["template"] == "plain" and tok.chat_template == TEMPLATES["plain"]
    assert cached.stats["train"]["firstExample"][1] == {"trained": True, "text": " cold</s>"}
