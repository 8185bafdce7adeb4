"""Data loading and format alignment: every file type and dataset format reaches the same
internal form, and every bad input is a SpecError naming the spec field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, TrainingSpec
from kubetune.trainer.train.data import build_datasets
from kubetune.trainer.train.data.aligners import align_source
from kubetune.trainer.train.data.loader import load_source

datasets.disable_progress_bars()

ALPACA_ROWS = [
    {"instruction": "Opposite of hot?", "input": "", "output": "cold"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Capital of Peru?", "input": "", "output": "Lima"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def aligned(path: Path | str, **source: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load + align one source; rows in the internal form and the source stats."""
    spec = DatasetSpec(path=str(path), **source)
    loaded = load_source(spec, field="data.datasets[0]")
    ds, stats = align_source(loaded, spec, field="data.datasets[0]")
    return list(ds), stats


def conv(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def make_spec(sources: list[dict[str, Any]], **data: Any) -> TrainingSpec:
    stage = data.pop("stage", "sft")
    train = data.pop("train", {})
    return TrainingSpec.model_validate(
        {
            "stage": stage,
            "model": {"path": "builtin:tiny-llama"},
            "data": {"datasets": sources, **data},
            "train": train,
        }
    )


@pytest.fixture
def tok(tiny_model_dir: Path):
    """A fresh tokenizer per test: build_datasets sets its chat_template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------ file types


EXPECTED_ALPACA = [
    conv(("user", "Opposite of hot?"), ("assistant", "cold")),
    conv(("user", "Add the numbers.\n2 and 3"), ("assistant", "5")),
    conv(("user", "Capital of Peru?"), ("assistant", "Lima")),
]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "json-lines-in-.json"])
def test_every_file_type_reads_the_same_rows(tmp_path: Path, kind: str) -> None:
    table = pa.Table.from_pylist(ALPACA_ROWS)
    if kind == "json":
        path = write_json(tmp_path / "d.json", ALPACA_ROWS)
    elif kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    elif kind == "json-lines-in-.json":
        path = write_jsonl(tmp_path / "d.json", ALPACA_ROWS)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(table, path)
    else:
        path = tmp_path / "d.csv"
        pcsv.write_csv(table, path)
    rows, stats = aligned(path)
    assert stats["format"] == "alpaca"
    assert [r["messages"] for r in rows] == EXPECTED_ALPACA
    assert all(r["text"] is None and r["tools"] is None for r in rows)


def test_directory_of_mixed_files_with_different_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:2])
    (tmp_path / "sub").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{**ALPACA_ROWS[2], "system": "Be brief."}]), tmp_path / "sub" / "b.parquet"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "x.jsonl", [{"instruction": "no", "output": "no"}])
    rows, stats = aligned(tmp_path)
    assert stats["rows"] == 3
    assert rows[2]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [r["messages"][-1]["content"] for r in rows] == ["cold", "5", "Lima"]


def test_max_samples_keeps_the_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    rows, _ = aligned(path, maxSamples=4)
    assert [r["text"] for r in rows] == ["doc 0", "doc 1", "doc 2", "doc 3"]


# ------------------------------------------------------------------------------ formats


def test_text_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "second"}])
    rows, stats = aligned(path)
    assert stats == {"path": str(path), "format": "text", "rows": 2, "invalid": 1}
    assert [r["text"] for r in rows] == ["hello world", "second"]
    assert all(r["messages"] == [] for r in rows)


def test_lmflow_text_only_and_text2text_files(tmp_path: Path) -> None:
    text_only = write_json(
        tmp_path / "t.json",
        {"type": "text_only", "instances": [{"text": "first doc"}, {"text": "second doc"}]},
    )
    rows, stats = aligned(text_only)
    assert stats["format"] == "lmflow"
    assert [r["text"] for r in rows] == ["first doc", "second doc"]

    # `instances` before `type`, so the type is not in the file's first bytes of a simple sniff
    pairs = write_json(
        tmp_path / "p.json",
        {
            "instances": [{"input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}],
            "type": "text2text",
        },
    )
    rows, stats = aligned(pairs, format="lmflow")
    assert stats["format"] == "lmflow"
    assert [r["messages"] for r in rows] == [
        conv(("user", "Q1"), ("assistant", "A1")),
        conv(("user", "Q2"), ("assistant", "A2")),
    ]


def test_lmflow_directory(tmp_path: Path) -> None:
    for i in range(3):
        write_json(tmp_path / f"data_{i}.json", {"type": "text_only", "instances": [{"text": f"doc {i}"}]})
    rows, stats = aligned(tmp_path)
    assert stats["format"] == "lmflow"
    assert [r["text"] for r in rows] == ["doc 0", "doc 1", "doc 2"]


def test_lmflow_directory_mixing_types_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"type": "text_only", "instances": [{"text": "x"}]})
    write_json(tmp_path / "b.json", {"type": "text2text", "instances": [{"input": "q", "output": "a"}]})
    with pytest.raises(SpecError) as err:
        aligned(tmp_path)
    assert err.value.field == "data.datasets[0].path"


def test_alpaca_with_system_and_history(tmp_path: Path) -> None:
    row = {
        "instruction": "And 3 + 3?",
        "input": "",
        "output": "6",
        "system": "You are a calculator.",
        "history": [["1 + 1?", "2"], ["2 + 2?", "4"]],
    }
    rows, _ = aligned(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert rows[0]["messages"] == conv(
        ("system", "You are a calculator."),
        ("user", "1 + 1?"),
        ("assistant", "2"),
        ("user", "2 + 2?"),
        ("assistant", "4"),
        ("user", "And 3 + 3?"),
        ("assistant", "6"),
    )


def test_sharegpt_from_value_with_system_and_tools(tmp_path: Path) -> None:
    tools = [{"name": "add", "description": "add numbers", "parameters": {"type": "object"}}]
    row = {
        "conversations": [
            {"from": "human", "value": "What is 2+3?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "It is 5."},
        ],
        "system": "Use tools.",
        "tools": json.dumps(tools),
    }
    rows, stats = aligned(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert stats["format"] == "sharegpt"
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert rows[0]["messages"][0]["content"] == "Use tools."
    assert json.loads(rows[0]["tools"]) == tools


def test_sharegpt_role_content_messages_column(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        "tools": [{"name": "noop"}],  # a list, not a string: stored as JSON
    }
    rows, stats = aligned(write_json(tmp_path / "m.json", [row]))
    assert stats["format"] == "sharegpt"
    assert rows[0]["messages"] == conv(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello"))
    assert json.loads(rows[0]["tools"]) == [{"name": "noop"}]


def test_sharegpt_rows_with_unknown_speakers_are_skipped_and_counted(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "narrator", "value": "q"}]}
    _, stats = aligned(write_jsonl(tmp_path / "s.jsonl", [good, bad, good]))
    assert (stats["rows"], stats["invalid"]) == (2, 1)


def test_column_remapping(tmp_path: Path) -> None:
    rows_in = [{"question": "Why?", "answer": "Because.", "persona": "Sage"}]
    rows, stats = aligned(
        write_jsonl(tmp_path / "q.jsonl", rows_in),
        columns={"instruction": "question", "output": "answer", "system": "persona"},
    )
    assert stats["format"] == "alpaca"  # auto-detected through the mapping
    assert rows[0]["messages"] == conv(("system", "Sage"), ("user", "Why?"), ("assistant", "Because."))

    rows, stats = aligned(write_jsonl(tmp_path / "b.jsonl", [{"body": "plain"}]), columns={"text": "body"})
    assert (stats["format"], rows[0]["text"]) == ("text", "plain")

    chat = [{"dialog": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    rows, stats = aligned(write_jsonl(tmp_path / "c.jsonl", chat), columns={"messages": "dialog"})
    assert stats["format"] == "sharegpt" and rows[0]["messages"][1]["content"] == "y"


# ------------------------------------------------------------------------------ bad inputs


def spec_error(tmp_path: Path, tok: Any, sources: list[dict[str, Any]], **data: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        build_datasets(make_spec(sources, **data), tok)
    return err.value


def test_missing_file(tmp_path: Path, tok: Any) -> None:
    err = spec_error(tmp_path, tok, [{"path": str(tmp_path / "nope.jsonl")}])
    assert err.field == "data.datasets[0].path"
    assert "does not exist" in str(err)


def test_missing_eval_file_names_eval_field(tmp_path: Path, tok: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    err = spec_error(
        tmp_path, tok, [{"path": str(train)}], evalDatasets=[{"path": str(tmp_path / "e.jsonl")}]
    )
    assert err.field == "data.evalDatasets[0].path"


def test_unknown_column(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    err = spec_error(tmp_path, tok, [{"path": str(path), "columns": {"text": "body"}}])
    assert err.field == "data.datasets[0].columns.text"
    assert "'body'" in str(err)


def test_format_that_does_not_match(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    for fmt in ("alpaca", "sharegpt", "lmflow"):
        err = spec_error(tmp_path, tok, [{"path": str(path), "format": fmt}])
        assert err.field == "data.datasets[0].format", fmt
    # the column exists but holds the wrong shape
    bad = write_jsonl(tmp_path / "c.jsonl", [{"conversations": "not a list"}])
    err = spec_error(tmp_path, tok, [{"path": str(bad)}])
    assert err.field == "data.datasets[0].format"


def test_undetectable_format(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"foo": "x", "bar": "y"}])
    err = spec_error(tmp_path, tok, [{"path": str(path)}])
    assert err.field == "data.datasets[0].format"
    assert "bar" in str(err) and "foo" in str(err)


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_empty_dataset(tmp_path: Path, tok: Any, content: str) -> None:
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    err = spec_error(tmp_path, tok, [{"path": str(path)}])
    assert err.field == "data.datasets[0].path"
    assert "no examples" in str(err)


def test_empty_directory_and_bad_json(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "empty").mkdir()
    err = spec_error(tmp_path, tok, [{"path": str(tmp_path / "empty")}])
    assert err.field == "data.datasets[0].path"
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    err = spec_error(tmp_path, tok, [{"path": str(broken)}])
    assert err.field == "data.datasets[0].path" and "line 2" in str(err)


def test_hub_dataset_unreachable(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = spec_error(tmp_path, tok, [{"path": "someorg/some-dataset"}])
    assert err.field == "data.datasets[0].path"
    assert "someorg/some-dataset" in str(err) and "offline" in str(err)


def test_hub_dataset_is_loaded_with_subset_and_split(
    tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake(path: str, name: str | None = None, split: str | None = None, streaming: bool = False) -> Any:
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list([{"text": "from the hub"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    bundle = build_datasets(make_spec([{"path": "org/ds", "subset": "en", "split": "validation"}]), tok)
    assert calls == [("org/ds", "en", "validation", False)]
    assert bundle.stats["sources"][0]["format"] == "text" and len(bundle.train) == 1


def test_first_row_must_fit_the_format(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": ["a", "b"]}])
    err = spec_error(tmp_path, tok, [{"path": str(path)}])
    assert err.field == "data.datasets[0].format"
    assert "first example" in str(err)


def test_unknown_template(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    err = spec_error(tmp_path, tok, [{"path": str(path)}], template="no-such-template")
    assert err.field == "data.template"
    err = spec_error(tmp_path, tok, [{"path": str(path)}], template="{% for m in messages %}")
    assert err.field == "data.template"


# ------------------------------------------------------------------------------ streaming


def test_streaming_reads_lazily_and_tokenizes(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", ALPACA_ROWS)
    write_json(tmp_path / "d" / "b.json", ALPACA_ROWS)
    spec = make_spec([{"path": str(tmp_path / "d"), "maxSamples": 5}], streaming=True, train={"maxSteps": 3})
    bundle = build_datasets(spec, tok)
    assert isinstance(bundle.train, datasets.IterableDataset)
    rows = list(bundle.train)
    assert len(rows) == 5
    answers = sorted(tok.decode([t for t in r["labels"] if t != -100]).strip() for r in rows)
    assert answers == sorted(["cold</s>", "5</s>", "Lima</s>", "cold</s>", "5</s>"])


def test_streaming_lmflow_and_pt_packing(tmp_path: Path, tok: Any) -> None:
    docs = [{"text": f"document number {i} has some words in it"} for i in range(40)]
    write_json(tmp_path / "t.json", {"type": "text_only", "instances": docs})
    spec = make_spec(
        [{"path": str(tmp_path / "t.json")}], stage="pt", maxLength=32, streaming=True, train={"maxSteps": 1}
    )
    bundle = build_datasets(spec, tok)
    rows = list(bundle.train)
    assert rows and all(len(r["input_ids"]) == 32 and len(r["position_ids"]) == 32 for r in rows)


def test_s3_paths_are_localized_by_the_storage_layer(
    tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubetune.trainer.train.data.loader as loader

    local = write_jsonl(tmp_path / "cache" / "d.jsonl", ALPACA_ROWS)
    calls = []

    def fake_localize(location: str, settings: Any = None, *, field: str) -> Path:
        calls.append((location, field, settings))
        return local.parent

    monkeypatch.setattr(loader, "localize", fake_localize)
    spec = make_spec([{"path": "s3://bucket/prefix/"}])
    bundle = build_datasets(spec, tok)
    assert calls == [("s3://bucket/prefix/", "data.datasets[0].path", spec.storage)]
    assert len(bundle.train) == 3
