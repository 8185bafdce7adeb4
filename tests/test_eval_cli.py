"""`kubetune eval` and the metrics behind it."""

from __future__ import annotations

import json

import pytest

from kubetune.trainer.cli.infer import main as cli_main
from kubetune.trainer.eval import corpus_bleu, exact_match, generation_scores, run_evaluation
from kubetune.trainer.eval.metrics import rouge_scores, rouge_tokens

from .test_infer_helpers import build_adapter, capitals_data, trained_model


def test_metrics_are_the_reference_implementations():
    """ROUGE is rouge-score's RougeScorer (F-measure, no stemming), BLEU sacreBLEU's corpus BLEU
    (13a tokenizer), on the 0-100 scale `kubetune eval` reports."""
    import sacrebleu
    from rouge_score import rouge_scorer

    ref = "The capital of France is Paris."
    assert corpus_bleu([ref], [ref]) == pytest.approx(100.0)
    # sacreBLEU 2.6: BLEU = 33.52 100.0/75.0/33.3/25.0 (BP = 0.670 ratio = 0.714 hyp_len = 5 ref_len = 7)
    assert corpus_bleu(["The capital is Paris."], [ref]) == pytest.approx(33.51600230178196)
    assert corpus_bleu(["Paris"], [ref]) == 0.0
    preds = ["The capital is Paris.", "It is sunny today in Paris", ref]
    refs = [ref, "Today it is sunny in Paris", "The capital of Italy is Rome."]
    assert corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert exact_match("the capital of france is Paris", ref) == 1.0
    assert exact_match("Paris", ref) == 0.0
    # rouge-score: 5 of 6 unigrams, 3 of 5 bigrams, an LCS of 5 tokens.
    scores = rouge_scores("the cat sat on the mat", "the cat was on the mat")
    assert scores == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for pred, target in zip(preds, refs, strict=True):
        expected = plain.score(target, pred)
        assert rouge_scores(pred, target) == pytest.approx({k: v.fmeasure for k, v in expected.items()})
    assert rouge_scores("the dogs are running", "the dog runs")["rouge1"] == pytest.approx(2 * (1 / 4 * 1 / 3) / (1 / 4 + 1 / 3))
    # CJK characters are tokens of their own (rouge-score's tokenizer alone would drop them).
    assert rouge_tokens("北京是首都 Paris!") == ["北", "京", "是", "首", "都", "paris"]
    assert rouge_scores("北京是首都", "北京是首都")["rougeL"] == pytest.approx(1.0)
    assert rouge_scores("北京是首都", "巴黎是首都")["rouge1"] == pytest.approx(3 / 5)
    assert corpus_bleu(["北京是中国的首都"], ["北京是中国的首都"]) == pytest.approx(100.0)
    assert corpus_bleu(["北京是中国的首都"], ["北京是中国的首都"]) == pytest.approx(
        sacrebleu.corpus_bleu(["北京是中国的首都"], [["北京是中国的首都"]], tokenize="zh").score)
    scores = generation_scores(["The capital is Paris.", ref], [ref, ref])
    assert scores["exact_match"] == 50.0 and 0 < scores["bleu4"] < 100 and scores["rougeL"] > scores["rouge2"]
    assert set(scores) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu4"}
    assert generation_scores([ref], [ref]) == pytest.approx(dict.fromkeys(scores, 100.0))


def _eval(model: str, out, capsys, *extra: str) -> dict:
    code = cli_main(["eval", model, "--data", str(capitals_data()), "--out", str(out), "--max-tokens", "16", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| perplexity |" in captured.out and "exact_match" in captured.out
    results = json.loads((out / "eval_results.json").read_text())["results"]
    return {r["task"]: r["metrics"] for r in results}


@pytest.mark.slow  # trains a model
def test_training_improves_eval_metrics(tmp_path, capsys):
    """The acceptance check: after a short training run, perplexity is lower and exact match is
    higher than for the untrained model, on the same data, through the CLI."""
    before = _eval("builtin:tiny-llama", tmp_path / "before", capsys)
    after = _eval(str(trained_model()), tmp_path / "after", capsys)
    assert after["perplexity"]["perplexity"] < 0.2 * before["perplexity"]["perplexity"]
    assert after["generation"]["exact_match"] > before["generation"]["exact_match"]
    assert after["generation"]["rougeL"] > before["generation"]["rougeL"] + 20
    table = (tmp_path / "after" / "eval_results.md").read_text()
    assert table.startswith("| model | dataset | task |") and "capitals" in table
    predictions = [json.loads(line) for line in (tmp_path / "after" / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 24 and all({"prompt", "prediction", "reference"} <= set(p) for p in predictions)


@pytest.mark.slow  # trains a model (trained_model())
def test_choice_task_and_adapters(tmp_path, tiny_model_dir):
    data = tmp_path / "mc.jsonl"
    rows = [{"question": "Capital of France?", "choices": ["Paris", "Oslo", "Lima"], "answer": "A"},
            {"question": "Capital of Peru?", "choices": ["Paris", "Oslo", "Lima"], "answer": "C"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_evaluation(str(trained_model()), str(data), tasks=["choice"])
    assert report.results[0].samples == 2 and 0 <= report.metric("choice", "accuracy") <= 100
    adapter = build_adapter("evaladapter", tiny_model_dir, seed=5)
    base = run_evaluation(str(tiny_model_dir), str(capitals_data()), tasks=["perplexity"], max_samples=8)
    tuned = run_evaluation(str(adapter), str(capitals_data()), tasks=["perplexity"], max_samples=8)
    assert tuned.results[0].model == "evaladapter"  # a LoRA output is evaluated as its adapter
    assert tuned.metric("perplexity", "perplexity") != base.metric("perplexity", "perplexity")


def test_eval_bad_inputs(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "missing"), "--data", str(capitals_data())]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", "builtin:tiny-llama", "--data", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kubetune: ") and "Traceback" not in err
    assert cli_main(["eval", "builtin:tiny-llama", "--data", str(capitals_data()), "--model-name", "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_perplexity_scores_exactly_the_tokens_training_labels(tiny_model_dir):
    """#17 item 7: `kubetune eval` (and a run's `eval:` block) scored the newline the default
    template puts after each answer's eos, which training never labels (perplexity ~4x too high).
    Its loss is now the training loss of the same rows: same tokens, same value."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.api.specfile import validate_training
    from kubetune.trainer.eval.run import perplexity
    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.batch import load_rows
    from kubetune.trainer.train.data import build_datasets

    data = str(capitals_data())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversation = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False).endswith("</s>\n")  # what was scored
    spec = validate_training({"model": {"path": str(tiny_model_dir)}, "data": {"datasets": [{"path": data}], "maxLength": 256}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in build_datasets(spec, tokenizer).train:
            count = sum(label != -100 for label in row["labels"][1:])
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            nll, tokens = nll + float(loss) * count, tokens + count
    metrics = perplexity(create_engine(str(tiny_model_dir), engine="transformers"), load_rows(data))
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-4)
