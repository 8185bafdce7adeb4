"""Preference data: every supported layout normalises to one form; bad data fails early."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.specfile import validate_training
from kubetune.trainer.train.data.aligners import HHAligner, PreferenceAligner, UnpairedAligner, parse_hh
from kubetune.trainer.train.data.processors import (
    ChatRenderer,
    PairwiseProcessor,
    ProcessorConfig,
    UnpairedProcessor,
)
from kubetune.trainer.train.data.templates import apply_template

from .conftest import EXAMPLES

PREFS = str(EXAMPLES / "data" / "demo_preferences.jsonl")


def align(aligner, row: dict, **columns) -> dict:
    cols = {role: columns.get(role, next((c for c in cands if c in row), None)) for role, cands in aligner.defaults.items()}
    return aligner.align_row(row, cols)


def test_pairwise_prompt_instruction_and_sharegpt_rows_align_to_one_form():
    plain = align(PreferenceAligner(), {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert plain == {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "5"}], "tools": None}
    alpaca = align(PreferenceAligner(), {"instruction": "Add", "input": "2 and 2", "system": "Be brief.", "chosen": "4", "rejected": "5"})
    assert alpaca["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n2 and 2"}]
    sharegpt = align(PreferenceAligner(), {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"}],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": [{"role": "assistant", "content": "5"}],
    })
    assert [m["role"] for m in sharegpt["prompt"]] == ["user", "assistant", "user"]
    assert sharegpt["chosen"] == [{"role": "assistant", "content": "4"}]
    assert sharegpt["rejected"] == [{"role": "assistant", "content": "5"}]


def test_hh_dialogues_split_at_the_first_differing_assistant_turn():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?"
    row = align(HHAligner(), {"chosen": shared + "\n\nAssistant: 4", "rejected": shared + "\n\nAssistant: 5"})
    assert [m["content"] for m in row["prompt"]] == ["hi", "hello", "2+2?"]
    assert row["chosen"] == [{"role": "assistant", "content": "4"}]
    assert row["rejected"] == [{"role": "assistant", "content": "5"}]
    as_lists = align(HHAligner(), {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    })
    assert as_lists["prompt"] == [{"role": "user", "content": "q"}]
    assert parse_hh("\n\nHuman: a\n\nAssistant: b")[1] == {"role": "assistant", "content": "b"}


def test_unpaired_rows_keep_a_boolean_label():
    row = align(UnpairedAligner(), {"prompt": "2+2?", "completion": "4", "label": "true"})
    assert row["label"] is True and row["completion"] == [{"role": "assistant", "content": "4"}]
    assert align(UnpairedAligner(), {"prompt": "2+2?", "completion": "5", "label": 0})["label"] is False


def test_pairwise_processor_prompt_is_the_inference_prompt(tiny_tokenizer):
    apply_template(tiny_tokenizer, None)
    row = align(PreferenceAligner(), {"prompt": "Add 2 and 3.", "chosen": "2 plus 3 is 5, five.", "rejected": "2 plus 3 is 6, six."})
    batch = {k: [v] for k, v in row.items()}
    out = PairwiseProcessor(tiny_tokenizer, ProcessorConfig(max_length=64))(batch)
    renderer = ChatRenderer(tiny_tokenizer)
    prompt_text = renderer.render(row["prompt"], add_generation_prompt=True)
    assert out["prompt_ids"][0] == tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(out["chosen_ids"][0]).strip().startswith("2 plus 3 is 5")
    assert out["chosen_ids"][0][-1] == tiny_tokenizer.eos_token_id  # the answer ends the turn
    short = PairwiseProcessor(tiny_tokenizer, ProcessorConfig(max_length=12))(batch)
    assert len(short["prompt_ids"][0]) + max(len(short["chosen_ids"][0]), len(short["rejected_ids"][0])) <= 12
    unpaired = UnpairedProcessor(tiny_tokenizer, ProcessorConfig(max_length=64))(
        {"prompt": [row["prompt"]], "completion": [row["chosen"]], "label": [True], "tools": [None]})
    assert unpaired["prompt_ids"] == out["prompt_ids"] and unpaired["label"] == [True]


def _spec(tmp_path: Path, path: str, stage: str = "dpo", **extra) -> dict:
    return {"stage": stage, "model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": path}], "maxLength": 48},
            "method": "full", "output": {"path": str(tmp_path / "out")}, **extra}


def test_build_datasets_reads_every_pairwise_layout(tmp_path, tiny_tokenizer):
    from kubetune.trainer.train.data import build_datasets
    from kubetune.trainer.train.data.demo_preferences import write_files

    _, hh = write_files(tmp_path, hh=True)
    for path in (PREFS, str(hh)):
        data = build_datasets(validate_training(_spec(tmp_path, path)), tiny_tokenizer)
        assert set(data.train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
        assert len(data.train) == 297 and data.stats["sources"][0]["format"] in ("preference", "hh")


def test_preference_data_without_rejected_is_a_spec_error(tmp_path, tiny_tokenizer):
    from kubetune.trainer.train.data import build_datasets

    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4"}) + "\n")
    with pytest.raises(SpecError, match="rejected") as auto:
        build_datasets(validate_training(_spec(tmp_path, str(path))), tiny_tokenizer)
    assert auto.value.field == "data.datasets[0].format"
    spec = _spec(tmp_path, str(path))
    spec["data"]["datasets"][0]["format"] = "preference"
    with pytest.raises(SpecError, match="rejected"):
        build_datasets(validate_training(spec), tiny_tokenizer)
    # ... and SFT data given to a preference stage, or preference data to sft, is refused by name.
    alpaca = str(EXAMPLES / "data" / "demo_alpaca.json")
    with pytest.raises(SpecError, match="pairwise preference data"):
        build_datasets(validate_training(_spec(tmp_path, alpaca, stage="rm")), tiny_tokenizer)
    spec = _spec(tmp_path, PREFS, stage="sft")
    spec["data"]["datasets"][0]["format"] = "preference"
    with pytest.raises(SpecError, match="does not fit this stage"):
        build_datasets(validate_training(spec), tiny_tokenizer)


def test_missing_reference_model_fails_before_training(tmp_path):
    from kubetune.trainer.train.runner import run

    spec = validate_training(_spec(tmp_path, PREFS, dpo={"referenceModel": str(tmp_path / "nope")}))
    with pytest.raises(SpecError, match="does not exist") as err:
        run(spec)
    assert err.value.field == "dpo.referenceModel"
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained
    simpo_with_ref = _spec(tmp_path, PREFS, dpo={"lossType": "simpo", "referenceModel": "builtin:tiny-llama"})
    with pytest.raises(SpecError, match="reference-free"):
        run(validate_training(simpo_with_ref))


def test_streaming_is_refused_for_preference_stages(tmp_path):
    spec = _spec(tmp_path, PREFS)
    spec["data"]["streaming"] = True
    spec["train"] = {"maxSteps": 2}
    with pytest.raises(Exception, match="not supported for stage dpo"):
        validate_training(spec)


def test_datasets_features_are_the_internal_form():
    assert set(PreferenceAligner.features) == {"prompt", "chosen", "rejected", "tools"}
    assert isinstance(UnpairedAligner.features["label"], datasets.Value)


def test_kto_splits_pairwise_data_into_a_desirable_and_an_undesirable_row():
    """Pairs given to the unpaired stage: each becomes two rows (TRL's unpairing), detected by `auto`."""
    from kubetune.trainer.api.spec import DatasetSpec
    from kubetune.trainer.train.data.aligners import align_source
    from kubetune.trainer.train.data.loader import load_source

    spec = DatasetSpec(path=PREFS)
    pairs = [json.loads(line) for line in Path(PREFS).read_text().splitlines()]
    rows, stats = align_source(load_source(spec, field="data.datasets[0]"), spec, field="data.datasets[0]", kind="unpaired")
    assert stats["format"] == "preference" and stats["rows"] == 2 * len(pairs) and stats["invalid"] == 0
    first, second = rows[0], rows[1]
    assert first["prompt"] == second["prompt"] == [{"role": "user", "content": pairs[0]["instruction"]}]
    assert (first["completion"][0]["content"], first["label"]) == (pairs[0]["chosen"], True)
    assert (second["completion"][0]["content"], second["label"]) == (pairs[0]["rejected"], False)


def _padding_and_order(args, data, tiny_model_dir) -> tuple[int, list[int]]:
    """Pad tokens over one epoch of the Trainer's own dataloader, and the order of the examples."""
    from transformers import AutoModelForCausalLM, Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=lambda rows: rows)
    pads, order = 0, []
    for batch in trainer.get_train_dataloader():
        widths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in batch]
        pads += max(widths) * len(widths) - sum(widths)
        order += [r["index"] for r in batch]
    return pads, order


@pytest.mark.slow
def test_preference_batches_are_grouped_by_length_seeded_and_cover_every_pair(tmp_path, tiny_tokenizer, tiny_model_dir):
    """DPO pairs are padded to the batch's longest: with `data.groupByLength` the run's sampler
    groups them by length (less padding than random batches), every pair once per epoch, the same
    order for the same seed."""
    from kubetune.trainer.train.data import build_datasets
    from kubetune.trainer.train.runner import build_training_args, with_lengths

    assert build_training_args(validate_training(_spec(tmp_path, PREFS)), tmp_path / "o", "fp32",
                               has_eval=False).train_sampling_strategy == "random"  # opt-in (see data.groupByLength)
    spec = validate_training(_spec(tmp_path, PREFS, data={"datasets": [{"path": PREFS}], "maxLength": 256,
                                                            "groupByLength": True}, train={"batchSize": 8}))
    data = with_lengths(spec, build_datasets(spec, tiny_tokenizer))
    data.train = data.train.add_column("index", list(range(len(data.train))))
    assert data.train["length"][0] == len(data.train[0]["prompt_ids"]) + max(len(data.train[0]["chosen_ids"]),
                                                                             len(data.train[0]["rejected_ids"]))
    grouped = build_training_args(spec, tmp_path / "o", "fp32", has_eval=False)
    assert grouped.train_sampling_strategy == "group_by_length"
    pads, order = _padding_and_order(grouped, data, tiny_model_dir)
    assert sorted(order) == list(range(len(data.train)))
    assert _padding_and_order(grouped, data, tiny_model_dir)[1] == order  # seeded
    random_args = build_training_args(spec, tmp_path / "o", "fp32", has_eval=False)
    random_args.train_sampling_strategy = "random"
    random_pads, _ = _padding_and_order(random_args, data, tiny_model_dir)
    assert pads < 0.5 * random_pads, (pads, random_pads)
