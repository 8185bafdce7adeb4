"""`kubetune eval` and `run_evaluation()`: score a model (or adapter) on datasets.

Tasks:
- `perplexity`: exp(mean token negative log-likelihood) over exactly the tokens training labels
  (`training_rows`): conversations rendered with the model's chat template and scored on every
  answer (through its eos, not what a template puts after it), plain-text rows on all tokens.
- `generation`: greedy answers to each conversation's prompt, compared with its final assistant
  turn: exact match, ROUGE-1/2/L and BLEU-4 (see `metrics.py`).
- `choice`: multiple-choice accuracy by log-likelihood (MMLU-style rows with a `question`,
  `choices` (or `A`..`D` columns) and an `answer` letter or index): the choice whose text is most
  likely after the question wins.

Results are written as `eval_results.json`, `eval_results.md` (a Markdown table) and, for
generation, `eval_predictions.jsonl`. `run_evaluation()` is what a training run calls at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import DatasetSpec, StorageSpec

log = logging.getLogger(__name__)

TASKS = ("perplexity", "generation", "choice")
DEFAULT_TASKS = ("perplexity", "generation")
RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
PREDICTIONS = "eval_predictions.jsonl"


@dataclass
class EvalResult:
    model: str
    dataset: str
    task: str
    metrics: dict[str, float]
    samples: int


@dataclass
class EvalReport:
    results: list[EvalResult] = field(default_factory=list)
    runtime_seconds: float = 0.0

    def metric(self, task: str, name: str, dataset: str | None = None) -> float:
        for r in self.results:
            if r.task == task and (dataset is None or r.dataset == dataset) and name in r.metrics:
                return r.metrics[name]
        raise KeyError(f"{task}/{name}")

    def to_dict(self) -> dict[str, Any]:
        return {"results": [asdict(r) for r in self.results], "runtimeSeconds": round(self.runtime_seconds, 3)}

    def to_markdown(self) -> str:
        names: list[str] = []
        for r in self.results:
            names += [n for n in r.metrics if n not in names]
        header = ["model", "dataset", "task", "samples", *names]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.results:
            cells = [r.model, r.dataset, r.task, str(r.samples)]
            cells += [_fmt(r.metrics[n]) if n in r.metrics else "" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RESULTS_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (directory / RESULTS_MD).write_text(self.to_markdown())
        return directory


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------
# log-likelihood scoring


def score_continuations(engine: Any, pairs: list[tuple[list[int], list[int]]], *, adapter: str | None = None,
                        batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation given its context."""
    rows = []
    for context, continuation in pairs:
        ids = (context + continuation)[-engine.context_length:]
        scored = min(len(continuation), len(ids) - 1)
        rows.append((ids, [-100] * (len(ids) - scored) + ids[len(ids) - scored:]))
    return score_labelled(engine, rows, adapter=adapter, batch_size=batch_size)


def score_labelled(engine: Any, rows: list[tuple[list[int], list[int]]], *, adapter: str | None = None,
                   batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of the labelled tokens of each (input_ids, labels)
    row (-100: not scored), each predicted from the tokens before it: the training loss's terms."""
    import torch

    model = engine.model
    device = engine.loaded.device
    results: list[tuple[float, int]] = []

    def body() -> None:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), engine.pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (ids, row_labels) in enumerate(chunk):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention[i, :len(ids)] = 1
                labels[i, :len(ids)] = torch.tensor(row_labels)
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:].to(device)
            mask = target != -100
            picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for i in range(len(chunk)):
                results.append((float(picked[i].sum()), int(mask[i].sum())))

    engine._with_adapter(adapter, lambda _: body(), None)
    return results


def training_rows(engine: Any, rows: Any, model: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of internal-form rows exactly as training builds them (the stage's
    processor, the model's chat template): conversations labelled on their answers (every
    assistant turn with its end-of-turn and eos, nothing after it), documents on every token as
    `pt` trains them. Perplexity scores these labels, so it measures what training optimised:
    scoring the text after the eos (a template's newline) inflated it several-fold."""
    import copy

    from kubetune.trainer.train.data.processors import PretrainProcessor, ProcessorConfig, SupervisedProcessor

    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.chat_template = engine.templates.get(model or engine.base_name) or engine.templates[engine.base_name]
    cfg = ProcessorConfig(max_length=engine.context_length)
    batch: dict[str, list] = {"messages": [], "tools": [], "text": []}
    for row in rows:
        batch["messages"].append([{"role": m["role"], "content": m["content"]} for m in row["messages"] or []])
        batch["tools"].append(row.get("tools"))
        batch["text"].append(row.get("text"))
    out: list[tuple[list[int], list[int]]] = []
    for processor, keep in ((SupervisedProcessor, bool), (PretrainProcessor, lambda m: not m)):
        chosen = [i for i, messages in enumerate(batch["messages"]) if keep(messages)]
        if chosen:
            part = processor(tokenizer, cfg)({name: [values[i] for i in chosen] for name, values in batch.items()})
            out += list(zip(part["input_ids"], part["labels"], strict=True))
    return out


def _transformers_engine(engine: Any) -> Any:
    if not hasattr(engine, "_with_adapter") or not hasattr(engine, "model"):
        raise SpecError("--task", f"perplexity and choice need the transformers engine, not {engine.name}.",
                        "run them with --engine transformers.")
    return engine


def perplexity(engine: Any, rows: Any, *, model: str | None = None, batch_size: int = 8) -> dict[str, float]:
    """exp(mean NLL) over exactly the tokens training labels (`training_rows`)."""
    engine = _transformers_engine(engine)
    adapter = engine.adapter_for(model)
    labelled = [(ids, labels) for ids, labels in training_rows(engine, rows, model) if len(ids) > 1]
    if not labelled:
        raise SpecError("--data", "no rows to score for perplexity.", "use text rows or conversations ending with an answer.")
    scores = score_labelled(engine, labelled, adapter=adapter, batch_size=batch_size)
    nll = -sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    loss = nll / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 700)), "loss": loss, "tokens": float(tokens)}


def generation(engine: Any, examples: list, *, model: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
               predictions_file: Path | None = None) -> dict[str, float]:
    from kubetune.trainer.eval.metrics import generation_scores
    from kubetune.trainer.serve.batch import generate_examples
    from kubetune.trainer.serve.params import SamplingParams

    usable = [e for e in examples if e.is_chat and e.reference is not None]
    if not usable:
        raise SpecError("--data", "no examples with a reference answer for the generation task.",
                        "use alpaca, sharegpt or text2text data whose last turn is the answer.")
    sequences = generate_examples(engine, usable, SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                                  model=model, batch_size=batch_size)
    predictions = [s.text.strip() for s in sequences]
    references = [e.reference.strip() for e in usable]
    if predictions_file is not None:
        predictions_file.parent.mkdir(parents=True, exist_ok=True)
        with predictions_file.open("w") as handle:
            for e, p, r in zip(usable, predictions, references, strict=True):
                handle.write(json.dumps({"prompt": e.messages, "prediction": p, "reference": r}, ensure_ascii=False) + "\n")
    return generation_scores(predictions, references)


LETTERS = "ABCDEFGHIJ"


def _choice_rows(rows: list[dict[str, Any]]) -> list[tuple[str, list[str], int]]:
    out = []
    for i, row in enumerate(rows):
        question = row.get("question") or row.get("instruction") or row.get("input")
        choices = row.get("choices") or row.get("options")
        if isinstance(choices, dict):
            choices = [choices[k] for k in sorted(choices)]
        if not choices:
            choices = [row[k] for k in LETTERS if k in row and row[k] is not None]
        answer = row.get("answer", row.get("label"))
        if isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices or [])]:
            answer = LETTERS.index(answer.strip().upper())
        elif isinstance(answer, str) and choices and answer in choices:
            answer = choices.index(answer)
        if not question or not choices or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise SpecError(f"--data row {i}", "multiple-choice rows need `question`, `choices` (or A-D columns) and "
                            "`answer` (a letter, an index or the choice text).", "fix the data or pick another --task.")
        out.append((str(question), [str(c) for c in choices], answer))
    return out


def choice_accuracy(engine: Any, path: str, *, model: str | None = None, max_samples: int | None = None,
                    batch_size: int = 8, storage: StorageSpec | None = None) -> dict[str, float]:
    from kubetune.trainer.train.data.loader import load_source

    engine = _transformers_engine(engine)
    adapter = engine.adapter_for(model)
    source = load_source(DatasetSpec(path=path, maxSamples=max_samples), field="--data", storage=storage)
    items = _choice_rows(list(source.dataset))
    pairs: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    for question, choices, _ in items:
        options = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))
        context = engine.encode_chat([{"role": "user", "content": f"{question}\n{options}"}], model)
        start = len(pairs)
        for choice in choices:
            pairs.append((context, engine.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]))
        spans.append((start, len(pairs)))
    scores = score_continuations(engine, pairs, adapter=adapter, batch_size=batch_size)
    correct = correct_norm = 0
    for (start, end), (_, _, answer) in zip(spans, items, strict=True):
        raw = [scores[k][0] for k in range(start, end)]
        norm = [scores[k][0] / max(scores[k][1], 1) for k in range(start, end)]
        correct += int(max(range(len(raw)), key=raw.__getitem__) == answer)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == answer)
    return {"accuracy": 100.0 * correct / len(items), "accuracy_norm": 100.0 * correct_norm / len(items),
            "_samples": float(len(items))}


# ---------------------------------------------------------------------------------------------
# the entry point


def run_evaluation(
    model: str | Any,
    data: str | DatasetSpec | list[str | DatasetSpec],
    *,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    format: str = "auto",
    served_model: str | None = None,
    adapters: list | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    output_dir: str | Path | None = None,
    storage: StorageSpec | None = None,
    engine: str = "transformers",
    **load_kwargs: Any,
) -> EvalReport:
    """Evaluate `model` (a location, or an already loaded `Engine`) on each dataset.

    A training run calls it at the end with its output directory and its eval datasets, e.g.
    `run_evaluation(str(output_dir), spec.data.evalDatasets, output_dir=output_dir / "eval",
    storage=spec.storage)`. `served_model` picks an adapter by name when several are loaded.
    Writes eval_results.json / eval_results.md into `output_dir` when given.
    """
    from kubetune.trainer.serve.engine import Engine
    from kubetune.trainer.serve.engines import create_engine

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SpecError("--task", f"unknown task(s) {unknown}.", f"use {', '.join(TASKS)}.")
    started = time.time()
    storage = storage or StorageSpec()
    if isinstance(model, Engine):
        eng = model
    else:
        eng = create_engine(model, engine=engine, adapters=adapters, storage=storage, **load_kwargs)
    label = served_model or eng.default_model  # a LoRA output directory is evaluated with its adapter
    selected = None if label == eng.base_name else label
    eng.adapter_for(selected)  # UnknownModel early
    sources = data if isinstance(data, list) else [data]
    if not sources:
        raise SpecError("--data", "no datasets to evaluate on.", "pass --data PATH.")
    report = EvalReport()
    out = Path(output_dir) if output_dir else None
    for source in sources:
        name = source.path if isinstance(source, DatasetSpec) else str(source)
        for task in tasks:
            metrics, count = _run_task(eng, task, source, name, model=selected, format=format, max_samples=max_samples,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, out=out, storage=storage)
            report.results.append(EvalResult(model=label, dataset=name, task=task, metrics=metrics, samples=count))
            log.info("eval %s on %s (%s): %s", label, name, task, metrics)
    report.runtime_seconds = time.time() - started
    if out is not None:
        report.write(out)
    return report


def _run_task(eng: Any, task: str, source: str | DatasetSpec, name: str, *, model: str | None, format: str,
              max_samples: int | None, batch_size: int, max_new_tokens: int, out: Path | None,
              storage: StorageSpec) -> tuple[dict[str, float], int]:
    """One task on one dataset: (metrics, samples scored)."""
    from kubetune.trainer.serve.batch import load_examples, load_rows

    if task == "perplexity":
        rows = load_rows(source, format=format, max_samples=max_samples, storage=storage)
        return perplexity(eng, rows, model=model, batch_size=batch_size), len(rows)
    if task == "generation":
        examples = load_examples(source, format=format, max_samples=max_samples, storage=storage)
        predictions = out / PREDICTIONS if out else None
        metrics = generation(eng, examples, model=model, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, predictions_file=predictions)
        return metrics, sum(1 for e in examples if e.is_chat and e.reference is not None)
    metrics = choice_accuracy(eng, name, model=model, max_samples=max_samples, batch_size=batch_size, storage=storage)
    return metrics, int(metrics.pop("_samples"))
