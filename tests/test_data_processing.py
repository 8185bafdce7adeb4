"""Tokenization, prompt masking, truncation, packing and collation, checked on decoded text."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.data import TEMPLATES, apply_template, build_datasets, make_collator
from kubetune.trainer.train.data.templates import describe_templates

datasets.disable_progress_bars()
IGNORE = -100


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_spec(path: str, **data: Any) -> TrainingSpec:
    stage = data.pop("stage", "sft")
    return TrainingSpec.model_validate(
        {
            "stage": stage,
            "model": {"path": "builtin:tiny-llama"},
            "data": {"datasets": [{"path": path}], **data},
        }
    )


@pytest.fixture
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_runs(tok: Any, row: dict[str, Any]) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def prompt_text(tok: Any, row: dict[str, Any]) -> str:
    return tok.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE]
    )


SINGLE = [{"instruction": "What is the opposite of hot?", "output": "The opposite of hot is cold."}]
ANSWER = "The opposite of hot is cold."


@pytest.mark.parametrize(
    ("template", "trained"),
    [
        ("default", f" {ANSWER}</s>"),
        ("chatml", f"{ANSWER}<|im_end|></s>"),
        ("llama3", f"{ANSWER}<|eot_id|></s>"),
        ("alpaca", f"{ANSWER}</s>"),
        ("vicuna", f" {ANSWER}</s>"),
    ],
)
def test_prompt_masking_per_template(tmp_path: Path, tok: Any, template: str, trained: str) -> None:
    bundle = build_datasets(make_spec(write_jsonl(tmp_path / "a.jsonl", SINGLE), template=template), tok)
    row = bundle.train[0]
    assert bundle.stats["template"] == template
    assert trained_runs(tok, row) == [trained]
    # the prompt is exactly what inference renders with add_generation_prompt, token for token
    messages = [{"role": "user", "content": SINGLE[0]["instruction"]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "What is the opposite of hot?" in prompt_text(tok, row)
    assert (
        row["input_ids"][: row["labels"].index(next(x for x in row["labels"] if x != IGNORE))]
        == tok(prompt, add_special_tokens=False)["input_ids"]
    )


def test_templates_are_listed_and_end_answers_with_eos(tok: Any) -> None:
    assert {"default", "chatml", "llama3", "alpaca", "vicuna"} <= set(TEMPLATES)
    assert [name for name, _ in describe_templates()] == list(TEMPLATES)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for name in TEMPLATES:
        assert apply_template(tok, name) == name
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert rendered.rstrip().endswith("</s>"), name


def test_apply_template_keeps_the_tokenizers_own_and_installs_named_ones(tok: Any) -> None:
    assert tok.chat_template == TEMPLATES["default"]  # the demo model ships kubetune's default explicitly
    assert apply_template(tok, None) == "tokenizer"
    tok.chat_template = None
    assert apply_template(tok, None) is None and tok.chat_template is None  # nothing made up: the data decides
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert apply_template(tok, custom) == "custom" and tok.chat_template == custom


def write_lmflow(path: Path, kind: str, instances: list[dict[str, str]]) -> str:
    path.write_text(json.dumps({"type": kind, "instances": instances}))
    return str(path)


T2T = [{"input": "Question: opposite of hot? Answer:", "output": " cold"},
       {"input": "Question: opposite of big? Answer:", "output": " small"}]


@pytest.mark.parametrize("own_template", [False, True])
def test_lmflow_text2text_renders_input_then_output_and_eos(tmp_path: Path, tok: Any, own_template: bool) -> None:
    """LMFlow's rendering whatever the tokenizer has: input, output (its leading space kept, no
    doubled one), eos; the loss on the output and eos only; recorded with the first example."""
    if not own_template:
        tok.chat_template = None
    bundle = build_datasets(make_spec(write_lmflow(tmp_path / "t.json", "text2text", T2T), shuffle=False), tok)
    assert bundle.stats["template"] == "plain" and "LMFlow" in bundle.stats["templateReason"]
    assert tok.chat_template == TEMPLATES["plain"]  # saved with the model: inference prompts the same way
    row = bundle.train[0]
    assert tok.decode(row["input_ids"]) == T2T[0]["input"] + T2T[0]["output"] + "</s>"
    assert trained_runs(tok, row) == [" cold</s>"]
    first = bundle.stats["train"]["firstExample"]
    assert first == [{"trained": False, "text": T2T[0]["input"]}, {"trained": True, "text": " cold</s>"}]
    stats = bundle.stats["train"]
    tokens = sum(len(r["input_ids"]) for r in bundle.train)
    masked = sum(label == IGNORE for r in bundle.train for label in r["labels"])
    assert stats["meanLength"] == pytest.approx(tokens / len(bundle.train), abs=0.01)
    assert stats["maskedFraction"] == pytest.approx(masked / tokens, abs=1e-3)


def test_lmflow_text_only_is_plain_text(tmp_path: Path, tok: Any) -> None:
    tok.chat_template = None
    path = write_lmflow(tmp_path / "t.json", "text_only", [{"text": "hot and cold"}])
    bundle = build_datasets(make_spec(path, stage="pt", packing=False), tok)
    assert bundle.stats["template"] == "none" and tok.chat_template is None
    assert tok.decode(bundle.train[0]["input_ids"]) == "hot and cold</s>"  # this tokenizer adds no bos


def test_conversations_without_a_chat_template_are_refused_naming_data_template(tmp_path: Path, tok: Any) -> None:
    from kubetune.trainer.api.errors import SpecError

    tok.chat_template = None
    with pytest.raises(SpecError) as err:
        build_datasets(make_spec(write_jsonl(tmp_path / "a.jsonl", SINGLE)), tok)
    assert err.value.field == "data.template" and "no chat template" in err.value.problem
    assert "`plain`" in (err.value.fix or "") and tok.chat_template is None
    bundle = build_datasets(make_spec(write_jsonl(tmp_path / "a.jsonl", SINGLE), template="plain"), tok)
    assert bundle.stats["template"] == "plain" and bundle.stats["templateReason"] == "data.template"
    assert trained_runs(tok, bundle.train[0]) == [ANSWER + "</s>"]


def test_text2text_mixed_with_chat_data_uses_the_tokenizers_template(tmp_path: Path, tok: Any) -> None:
    spec = TrainingSpec.model_validate({"model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [
        {"path": write_lmflow(tmp_path / "t.json", "text2text", T2T)}, {"path": write_jsonl(tmp_path / "a.jsonl", SINGLE)}]}})
    bundle = build_datasets(spec, tok)
    assert bundle.stats["template"] == "default" and bundle.stats["templateReason"] == "the tokenizer's own chat template"


def test_multi_turn_trains_every_assistant_turn(tmp_path: Path, tok: Any) -> None:
    conversation = {
        "system": "Be short.",
        "conversations": [
            {"from": "human", "value": "Say one."},
            {"from": "gpt", "value": "One."},
            {"from": "human", "value": "Say two."},
            {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "Say three."},
            {"from": "gpt", "value": "Three."},
        ],
    }
    bundle = build_datasets(make_spec(write_jsonl(tmp_path / "s.jsonl", [conversation])), tok)
    row = bundle.train[0]
    assert trained_runs(tok, row) == [" One.</s>", " Two.</s>", " Three.</s>"]
    prompt = prompt_text(tok, row)
    for text in ("Be short.", "Say one.", "Say two.", "Say three."):
        assert text in prompt
    assert "One." not in prompt


def test_mask_prompt_false_and_text_rows_train_everything(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", SINGLE)
    row = build_datasets(make_spec(path, maskPrompt=False), tok).train[0]
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]).startswith("<s>User: What is")

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words here"}])
    row = build_datasets(make_spec(text), tok).train[0]
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]) == "plain words here</s>"


def test_non_prefix_stable_template_falls_back_to_locating_answers(tmp_path: Path, tok: Any) -> None:
    # the generation prompt ("Bot>") differs from how answers are rendered ("Answer: ...")
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}Answer: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Bot>{% endif %}"
    )
    bundle = build_datasets(make_spec(write_jsonl(tmp_path / "a.jsonl", SINGLE), template=template), tok)
    assert trained_runs(tok, bundle.train[0]) == [f"{ANSWER}</s>"]


def test_truncation_keeps_part_of_the_answer(tmp_path: Path, tok: Any) -> None:
    long_prompt = "words " * 200 + "What is the opposite of hot?"
    long_answer = " ".join(f"item{i}" for i in range(200))
    rows = [
        {"instruction": long_prompt, "output": "cold"},
        {"instruction": "List items.", "output": long_answer},
        {"instruction": long_prompt, "output": long_answer},
    ]
    bundle = build_datasets(
        make_spec(write_jsonl(tmp_path / "a.jsonl", rows), maxLength=64, shuffle=False), tok
    )
    assert bundle.stats["train"]["truncated"] == 3
    long_prompt_row, long_answer_row, both_row = (bundle.train[i] for i in range(3))
    for row in (long_prompt_row, long_answer_row, both_row):
        assert len(row["input_ids"]) == 64
    # long prompt: the whole answer is kept; the prompt keeps bos and its end (the question)
    assert trained_runs(tok, long_prompt_row) == [" cold</s>"]
    assert long_prompt_row["input_ids"][0] == tok.bos_token_id
    assert prompt_text(tok, long_prompt_row).endswith("What is the opposite of hot?\nAssistant:")
    # long answer: the prompt is whole, the answer is cut at the end
    assert prompt_text(tok, long_answer_row) == "<s>User: List items.\nAssistant:"
    assert long_answer.startswith(trained_runs(tok, long_answer_row)[0].strip())
    # both long: the answer keeps at least half of the sequence
    assert sum(label != IGNORE for label in both_row["labels"]) >= 32


def test_examples_without_trainable_tokens_are_dropped(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
    ]
    bundle = build_datasets(make_spec(write_jsonl(tmp_path / "s.jsonl", rows)), tok)
    assert len(bundle.train) == 1
    assert bundle.stats["train"]["droppedNoLabels"] == 1


def test_pt_without_packing_truncates(tmp_path: Path, tok: Any) -> None:
    docs = [{"text": "short doc"}, {"text": "long " * 100}]
    bundle = build_datasets(
        make_spec(
            write_jsonl(tmp_path / "t.jsonl", docs), stage="pt", packing=False, maxLength=16, shuffle=False
        ),
        tok,
    )
    first, second = bundle.train[0], bundle.train[1]
    assert tok.decode(first["input_ids"]) == "short doc</s>" and first["labels"] == first["input_ids"]
    assert len(second["input_ids"]) == 16 and "position_ids" not in second
    assert bundle.stats["train"]["truncated"] == 1


def test_pt_packing_fills_rows_and_loses_only_the_tail(tmp_path: Path, tok: Any) -> None:
    docs = [{"text": f"Document {i}: " + "the quick brown fox " * (i % 7 + 1)} for i in range(60)]
    spec = make_spec(write_jsonl(tmp_path / "t.jsonl", docs), stage="pt", maxLength=48, shuffle=False)
    assert spec.packing_enabled
    bundle = build_datasets(spec, tok)
    stream = []
    for doc in docs:
        stream += tok(doc["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = list(bundle.train)
    assert all(len(r["input_ids"]) == 48 for r in rows)
    packed = [t for r in rows for t in r["input_ids"]]
    assert len(packed) == len(stream) - len(stream) % 48  # only the tail is lost
    assert packed == stream[: len(packed)]
    for row in rows:
        positions = row["position_ids"]
        assert positions[0] == 0
        for i in range(1, 48):
            starts_doc = row["input_ids"][i - 1] == tok.eos_token_id
            assert positions[i] == (0 if starts_doc else positions[i - 1] + 1)
            assert (row["labels"][i] == IGNORE) == starts_doc
            if not starts_doc:
                assert row["labels"][i] == row["input_ids"][i]


def test_pt_packing_eval_keeps_the_tail(tmp_path: Path, tok: Any) -> None:
    docs = [{"text": f"doc {i} " + "word " * 5} for i in range(40)]
    spec = make_spec(write_jsonl(tmp_path / "t.jsonl", docs), stage="pt", maxLength=64, evalSize=10)
    bundle = build_datasets(spec, tok)
    assert bundle.eval is not None
    assert bundle.stats["eval"]["packedTokens"] == bundle.stats["eval"]["tokens"]
    assert len(bundle.eval[len(bundle.eval) - 1]["input_ids"]) <= 64


def test_pt_with_too_little_data_for_one_packed_row(tmp_path: Path, tok: Any) -> None:
    from kubetune.trainer.api.errors import SpecError

    with pytest.raises(SpecError) as err:
        build_datasets(make_spec(write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}]), stage="pt"), tok)
    assert err.value.field == "data.maxLength"


def sft_rows(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}." + " Yes." * (a % 4)}
        for a, b in ((i % 10, (i * 3) % 10) for i in range(n))
    ]


def test_sft_packing_restarts_positions_and_keeps_examples(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(40))
    plain = build_datasets(make_spec(path, maxLength=96), tok).train
    packed_bundle = build_datasets(make_spec(path, maxLength=96, packing=True), tok)
    packed = packed_bundle.train
    assert len(packed) < len(plain)
    examples = []
    for row in packed:
        assert len(row["input_ids"]) <= 96
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert starts[0] == 0 and len(starts) >= 2
        for a, b in itertools.pairwise(starts):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE
            examples.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1 : b])))
    expected = sorted((tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in plain)
    assert sorted(examples) == expected


def test_packed_logits_match_each_example_alone(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(12))
    spec = make_spec(path, maxLength=128, packing=True, paddingFree=False)
    rows = list(build_datasets(spec, tok).train)
    batch = make_collator(tok, spec)(rows[:2])  # padded packed batch: no attention_mask
    assert "attention_mask" not in batch and "position_ids" in batch
    assert batch["use_cache"] is False  # else transformers skips packed-sequence detection
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=impl, dtype=torch.float32
        )
        model.train()  # as under Trainer (the tiny model has no dropout), config.use_cache left True
        assert model.config.use_cache
        with torch.no_grad():
            logits = model(**batch).logits
            naive = model(input_ids=batch["input_ids"][:1]).logits  # no position_ids: one causal sequence
        checked = 0
        for b, row in enumerate(rows[:2]):
            positions = row["position_ids"]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, e in itertools.pairwise(starts):
                with torch.no_grad():
                    alone = model(input_ids=torch.tensor([row["input_ids"][a:e]])).logits[0]
                torch.testing.assert_close(logits[b, a:e], alone, atol=1e-4, rtol=0)
                checked += 1
        assert checked >= 4
        # the check is meaningful: without restarting positions the second example differs
        a, e = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0][1:3]
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([rows[0]["input_ids"][a:e]])).logits[0]
        assert (naive[0, a:e] - alone).abs().max() > 1e-3


def test_collator_pads_unpacked_rows(tok: Any) -> None:
    spec = make_spec("unused.jsonl", paddingFree=False)
    collate = make_collator(tok, spec)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def test_collator_packed_rows_padded_and_flattened(tok: Any) -> None:
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
    ]
    padded = make_collator(tok, make_spec("unused.jsonl", packing=True, paddingFree=False))(rows)
    assert "attention_mask" not in padded
    assert padded["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert padded["labels"].tolist()[1] == [-100, 6, -100, -100]
    flat = make_collator(tok, make_spec("unused.jsonl", paddingFree=False), flatten_packed=True)(rows)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]
    assert flat["use_cache"] is False and "attention_mask" not in flat


def test_padding_free_is_the_default_and_flattens_the_batch(tok: Any) -> None:
    """#19 item 1: `sft`/`pt` batches carry no pad tokens by default: one row, positions
    restarting per example, no label across an example boundary, no attention mask."""
    spec = make_spec("unused.jsonl")
    assert spec.padding_free_enabled and spec.to_document()["data"]["paddingFree"] is True
    assert not make_spec("unused.jsonl", stage="dpo").padding_free_enabled  # TRL collates pairs
    remote = TrainingSpec.model_validate({"stage": "sft", "model": {"path": "builtin:tiny-llama", "trustRemoteCode": True},
                                          "data": {"datasets": [{"path": "unused.jsonl"}]}})
    assert not remote.padding_free_enabled  # its attention may not read packed positions
    batch = make_collator(tok, spec)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    # the examples' boundaries, as transformers' flattening collator gives them to varlen attention
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert batch["max_length_q"] == batch["max_length_k"] == 3


def test_padding_free_loss_equals_the_padded_batch_and_nothing_crosses_a_boundary(tmp_path: Path, tok: Any,
                                                                                   tiny_model_dir: Path) -> None:
    """The loss of one flattened batch equals the padded batch's (the token mean over the same
    labelled tokens) to 1e-4, and changing one example leaves another's logits untouched."""
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(8))
    rows = list(build_datasets(make_spec(path, maxLength=128), tok).train)[:4]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # different lengths: the padded batch pads
    flat = make_collator(tok, make_spec(path))(rows)
    padded = make_collator(tok, make_spec(path, paddingFree=False))(rows)
    for impl in ("sdpa", "eager", register_varlen()):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            flat_loss = model(**flat).loss
            padded_loss = model(**padded).loss
            assert abs(flat_loss.item() - padded_loss.item()) < 1e-4, (impl, flat_loss, padded_loss)
            changed = [dict(rows[0], input_ids=[3] * len(rows[0]["input_ids"])), *rows[1:]]
            again = make_collator(tok, make_spec(path))(changed)
            first = len(rows[0]["input_ids"])
            logits = model(**{k: v for k, v in flat.items() if k != "labels"}).logits
            logits2 = model(**{k: v for k, v in again.items() if k != "labels"}).logits
        assert (logits[0, first:] - logits2[0, first:]).abs().max() < 1e-5  # the other examples do not see it
        assert (logits[0, :first] - logits2[0, :first]).abs().max() > 1e-3  # the check is meaningful


def register_varlen() -> str:
    from kubetune.trainer.train.models.varlen import register

    return register()


def test_varlen_sdpa_equals_the_block_diagonal_mask_in_loss_and_gradients(tmp_path: Path, tok: Any,
                                                                          tiny_model_dir: Path) -> None:
    """SDPA per example (what a padding-free run uses without flash-attn) gives the loss and every
    gradient of transformers' SDPA over the row's block-diagonal mask, to float32 rounding; a
    padded batch (its attention mask) and generation with a KV cache go through SDPA unchanged."""
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(8))
    rows = list(build_datasets(make_spec(path, maxLength=128), tok).train)[:4]
    flat = make_collator(tok, make_spec(path))(rows)
    padded = make_collator(tok, make_spec(path, paddingFree=False))(rows)
    results = {}
    for impl in ("sdpa", register_varlen()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl, dtype=torch.float32)
        loss = model(**flat).loss
        loss.backward()
        with torch.no_grad():
            padded_logits = model(**padded).logits
            generated = model.generate(input_ids=padded["input_ids"][:2, :5], attention_mask=padded["attention_mask"][:2, :5],
                                       max_new_tokens=4, do_sample=False)
        results[impl] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, padded_logits, generated)
    (loss_a, grads_a, padded_a, gen_a), (loss_b, grads_b, padded_b, gen_b) = results.values()
    assert abs(loss_a - loss_b) < 1e-5
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) < 1e-5
    assert torch.equal(padded_a, padded_b) and torch.equal(gen_a, gen_b)


def test_deterministic_for_a_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(50))

    def ids(seed: int) -> list[list[int]]:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        spec = make_spec(path, evalSize=0.2)
        spec.train.seed = seed
        return build_datasets(spec, tokenizer).train["input_ids"]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + (eos_token if m['role'] == 'assistant' else '') }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_template_that_rejects_the_data(tmp_path: Path, tok: Any) -> None:
    from kubetune.trainer.api.errors import SpecError

    plain = {"instruction": "Hi?", "output": "Hello."}
    with_system = {**plain, "system": "Be kind."}
    bundle = build_datasets(
        make_spec(write_jsonl(tmp_path / "a.jsonl", [plain, with_system, plain]), template=STRICT_TEMPLATE),
        tok,
    )
    assert len(bundle.train) == 2 and bundle.stats["train"]["droppedNoLabels"] == 1
    assert trained_runs(tok, bundle.train[0]) == ["Hello.</s>"]
    with pytest.raises(SpecError) as err:
        build_datasets(
            make_spec(write_jsonl(tmp_path / "b.jsonl", [with_system]), template=STRICT_TEMPLATE), tok
        )
    assert err.value.field == "data.template" and "System role not supported" in str(err.value)


def test_pt_on_conversations_renders_the_template_and_trains_everything(tmp_path: Path, tok: Any) -> None:
    spec = make_spec(write_jsonl(tmp_path / "a.jsonl", SINGLE), stage="pt", packing=False)
    row = build_datasets(spec, tok).train[0]
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]) == f"<s>User: What is the opposite of hot?\nAssistant: {ANSWER}</s>"


@pytest.mark.parametrize("padding_free", [True, False])
def test_logits_on_labelled_positions_give_the_full_loss_and_gradients(tmp_path: Path, tok: Any, tiny_model_dir: Path,
                                                                       padding_free: bool) -> None:
    """`train.logitsOnLabels`: the loss from logits at labelled positions only equals the model's own
    loss over full logits (to 1e-5), normalised per batch and by `num_items_in_batch`, and so do the
    gradients; fewer logits are computed when prompts are masked."""
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.train.stages.causal_lm import labelled_logits_loss, labelled_positions

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows(8))
    rows = list(build_datasets(make_spec(path, maxLength=128), tok).train)[:4]
    batch = make_collator(tok, make_spec(path, paddingFree=padding_free))(rows)
    batch.pop("use_cache", None)
    assert len(labelled_positions(batch["labels"])) < batch["labels"].shape[1] - 1  # prompts are skipped
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for items in (None, torch.tensor(57)):
        extra = {} if items is None else {"num_items_in_batch": items}
        model.zero_grad()
        full = model(**batch, use_cache=False, **extra).loss
        full.backward()
        full_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ours = labelled_logits_loss(model, {**batch, "use_cache": False}, items)
        ours.backward()
        assert abs(full.item() - ours.item()) < 1e-5, (items, full, ours)
        for a, (name, p) in zip(full_grads, model.named_parameters(), strict=True):
            assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4), name
