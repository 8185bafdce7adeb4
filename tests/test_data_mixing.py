"""Mixing several sources (concat / interleave with weights) and the evaluation split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.data import build_datasets

datasets.disable_progress_bars()


def write_texts(path: Path, tag: str, n: int) -> dict[str, Any]:
    path.write_text("".join(json.dumps({"text": f"{tag} {i}"}) + "\n" for i in range(n)))
    return {"path": str(path)}


def make_spec(sources: list[dict[str, Any]], **data: Any) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {"stage": "sft", "model": {"path": "builtin:tiny-llama"}, "data": {"datasets": sources, **data}}
    )


@pytest.fixture
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tags(tok: Any, ds: Any) -> Counter:
    """How many rows came from each source (text rows are `alpha 3`, `beta 7`, ...)."""
    return Counter(tok.decode(ids).split()[0] for ids in ds["input_ids"])


def test_concat_keeps_every_row_once(tmp_path: Path, tok: Any) -> None:
    sources = [write_texts(tmp_path / "a.jsonl", "alpha", 30), write_texts(tmp_path / "b.jsonl", "beta", 10)]
    bundle = build_datasets(make_spec(sources), tok)
    assert tags(tok, bundle.train) == {"alpha": 30, "beta": 10}
    texts = sorted(tok.decode(ids) for ids in bundle.train["input_ids"])
    assert len(set(texts)) == 40
    # shuffled: the sources are not left in two blocks
    first = [tok.decode(ids).split()[0] for ids in bundle.train["input_ids"][:20]]
    assert "beta" in first


def test_interleave_under_honours_weights(tmp_path: Path, tok: Any) -> None:
    a = {**write_texts(tmp_path / "a.jsonl", "alpha", 400), "weight": 3}
    b = {**write_texts(tmp_path / "b.jsonl", "beta", 400), "weight": 1}
    bundle = build_datasets(make_spec([a, b], mixStrategy="interleave_under"), tok)
    counts = tags(tok, bundle.train)
    share = counts["alpha"] / (counts["alpha"] + counts["beta"])
    assert abs(share - 0.75) < 0.05, counts
    # stops when the first source runs out: alpha is used once, beta undersampled
    assert counts["alpha"] <= 400 and counts["beta"] < 200


def test_interleave_over_repeats_until_every_source_is_seen(tmp_path: Path, tok: Any) -> None:
    a = {**write_texts(tmp_path / "a.jsonl", "alpha", 100), "weight": 1}
    b = {**write_texts(tmp_path / "b.jsonl", "beta", 100), "weight": 4}
    bundle = build_datasets(make_spec([a, b], mixStrategy="interleave_over"), tok)
    counts = tags(tok, bundle.train)
    share = counts["beta"] / (counts["alpha"] + counts["beta"])
    assert abs(share - 0.8) < 0.05, counts
    assert counts["alpha"] >= 100  # every alpha row seen at least once
    distinct_alpha = {
        tok.decode(ids) for ids in bundle.train["input_ids"] if tok.decode(ids).startswith("alpha")
    }
    assert len(distinct_alpha) == 100


def test_mixing_is_seeded(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    a = {**write_texts(tmp_path / "a.jsonl", "alpha", 50), "weight": 1}
    b = {**write_texts(tmp_path / "b.jsonl", "beta", 50), "weight": 1}

    def order(seed: int) -> list[list[int]]:
        spec = make_spec([a, b], mixStrategy="interleave_under")
        spec.train.seed = seed
        return build_datasets(spec, AutoTokenizer.from_pretrained(tiny_model_dir)).train["input_ids"]

    assert order(3) == order(3)
    assert order(3) != order(4)


@pytest.mark.parametrize(("eval_size", "expected_eval"), [(0.1, 20), (0.25, 50), (15, 15), (1, 1)])
def test_eval_size_fraction_and_count(tmp_path: Path, tok: Any, eval_size: float, expected_eval: int) -> None:
    bundle = build_datasets(
        make_spec([write_texts(tmp_path / "a.jsonl", "alpha", 200)], evalSize=eval_size), tok
    )
    assert bundle.eval is not None
    assert len(bundle.eval) == expected_eval
    assert len(bundle.train) == 200 - expected_eval
    train = {tok.decode(ids) for ids in bundle.train["input_ids"]}
    held_out = {tok.decode(ids) for ids in bundle.eval["input_ids"]}
    assert not train & held_out


def test_eval_count_is_split_across_sources_by_size(tmp_path: Path, tok: Any) -> None:
    sources = [
        write_texts(tmp_path / "a.jsonl", "alpha", 100),
        write_texts(tmp_path / "b.jsonl", "beta", 300),
    ]
    bundle = build_datasets(make_spec(sources, evalSize=40, mixStrategy="interleave_over"), tok)
    assert tags(tok, bundle.eval) == {"alpha": 10, "beta": 30}
    train = {tok.decode(ids) for ids in bundle.train["input_ids"]}
    held_out = {tok.decode(ids) for ids in bundle.eval["input_ids"]}
    assert not train & held_out  # oversampling never leaks eval rows into training


def test_no_eval_by_default_and_explicit_eval_datasets(tmp_path: Path, tok: Any) -> None:
    train = write_texts(tmp_path / "a.jsonl", "alpha", 20)
    assert build_datasets(make_spec([train]), tok).eval is None
    held = write_texts(tmp_path / "e.jsonl", "gamma", 7)
    bundle = build_datasets(make_spec([train], evalDatasets=[held]), tok)
    assert len(bundle.train) == 20
    assert tags(tok, bundle.eval) == {"gamma": 7}
    assert bundle.stats["evalSources"][0]["rows"] == 7


@pytest.mark.parametrize("eval_size", [200, 500, 0.001])
def test_eval_size_too_large_or_too_small(tmp_path: Path, tok: Any, eval_size: float) -> None:
    with pytest.raises(SpecError) as err:
        build_datasets(make_spec([write_texts(tmp_path / "a.jsonl", "alpha", 200)], evalSize=eval_size), tok)
    assert err.value.field == "data.evalSize"
