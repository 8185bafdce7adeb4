"""Processors: internal-form rows -> token rows for one training stage.

A processor is a batched function over the internal form (`messages`/`tools`/`text`, see
`aligners`) producing `input_ids` and `labels` (-100 where no loss is taken). Each stage has one;
`PROCESSORS` maps the stage name to it, so rm/dpo/kto add a processor (with their own columns)
without touching these.

How SFT masking works: the conversation is rendered with the chat template, and each assistant
turn's character span is found by rendering the conversation up to that turn with
`add_generation_prompt=True` (exactly what the model is given at inference) and up to the end of
the turn (the answer plus its end-of-turn/eos tokens). The text is cut at the span boundaries and
the pieces are tokenized separately, prompt pieces labelled -100: so the prompt tokens are exactly
the tokens inference produces for the same prompt (no BPE merge across the prompt/answer boundary
that generation could never reproduce). This needs no per-template masking code, works for any
template whose generation prompt is a prefix of the rendered turn (all built-ins, most hub
templates), and falls back to locating the answer text for templates that are not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.train.data.templates import compile_template, current_template

IGNORE_INDEX = -100
TOKEN_COLUMNS = ("input_ids", "labels")


@dataclass
class ProcessorConfig:
    """What a processor needs from the spec, as plain values (picklable for worker processes)."""

    max_length: int
    mask_prompt: bool = True
    min_response_share: float = 0.5
    """When the first answer does not fit after its prompt, the answer keeps at least this share
    of `max_length` and the prompt is cut from the left (its end, next to the answer, is kept)."""
    extra: dict[str, Any] = field(default_factory=dict)


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template and finds assistant spans."""

    def __init__(self, tokenizer: Any):
        template = current_template(tokenizer)
        if template is None:
            raise ValueError("the tokenizer has no chat template; call apply_template first")
        self.template = compile_template(template)
        self.eos = tokenizer.eos_token or ""
        self.variables = {
            name: getattr(tokenizer, name, None) or ""
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }

    def render(
        self, messages: list[dict[str, str]], tools: Any = None, add_generation_prompt: bool = False
    ) -> str:
        return self.template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self.variables
        )

    def render_conversation(self, messages: list[dict[str, str]], tools: Any = None) -> str:
        """A whole conversation as training text: a separator after the last answer is dropped
        (nothing is ever predicted from it)."""
        text = self.render(messages, tools)
        return text.rstrip() if messages and messages[-1]["role"] == "assistant" else text

    @staticmethod
    def parse_tools(tools: str | None) -> Any:
        """Tools are stored as a JSON string; templates expect the decoded list."""
        if not tools:
            return None
        try:
            value = json.loads(tools)
        except ValueError:
            return [tools]
        return value if isinstance(value, list) else [value]

    def spans(self, messages: list[dict[str, str]], tools: str | None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        tools_value = self.parse_tools(tools)
        full = self.render_conversation(messages, tools_value)
        spans: list[tuple[int, int]] = []
        cursor = 0
        last = len(messages) - 1
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], tools_value, add_generation_prompt=True)
            upto = full if k == last else self.render(messages[: k + 1], tools_value)
            if upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= cursor:
                start, end = len(prompt), len(upto.rstrip())
                end = max(end, start)
            else:  # template is not prefix-stable: locate the answer text itself
                start, end = self._locate(full, message["content"], max(cursor, _common_prefix(prompt, full)))
                if start < 0:
                    continue
            spans.append((start, end))
            cursor = end
        return full, spans

    def _locate(self, full: str, content: str, cursor: int) -> tuple[int, int]:
        for needle in (content, content.strip()):
            if not needle:
                continue
            start = full.find(needle, cursor)
            if start >= 0:
                end = start + len(needle)
                if self.eos and full.startswith(self.eos, end):
                    end += len(self.eos)
                return start, end
        return -1, -1


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def truncate(
    ids: np.ndarray, labels: np.ndarray, cfg: ProcessorConfig, bos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fit an example into `max_length` while keeping (part of) its first answer.

    When the prompt and the first answer fit, the tail is cut (later turns are lost). Otherwise the
    answer keeps `min(answer, max(room after the prompt, min_response_share * max_length))` tokens
    and the prompt keeps its *last* tokens (after a leading bos), since the end of the prompt (the
    question and the assistant header) is what the answer depends on most.
    """
    limit = cfg.max_length
    if len(ids) <= limit:
        return ids, labels
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if len(trained) == 0:
        return ids[:limit], labels[:limit]
    first = int(trained[0])
    run_end = first
    while run_end < len(labels) and labels[run_end] != IGNORE_INDEX:
        run_end += 1
    answer = run_end - first
    if first + answer <= limit:
        return ids[:limit], labels[:limit]
    keep_answer = min(answer, max(limit - first, int(limit * cfg.min_response_share)))
    keep_prompt = limit - keep_answer
    head = 1 if bos_id is not None and len(ids) and ids[0] == bos_id and keep_prompt > 1 else 0
    prompt_idx = np.concatenate([np.arange(head), np.arange(first - (keep_prompt - head), first)])
    index = np.concatenate([prompt_idx, np.arange(first, first + keep_answer)]).astype(np.int64)
    return ids[index], labels[index]


class Processor:
    """Base: a stage's batched tokenization function. `columns` says what it outputs."""

    columns: tuple[str, ...] = TOKEN_COLUMNS

    def __init__(self, tokenizer: Any, cfg: ProcessorConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def _texts(self, batch: dict[str, list], renderer: ChatRenderer | None) -> list[str | None]:
        """Plain text for every row: documents as-is, conversations rendered with the template
        (None where the template rejects the conversation: the row is dropped and counted)."""
        out: list[str | None] = []
        for messages, tools, text in zip(batch["messages"], batch["tools"], batch["text"], strict=True):
            if messages:
                assert renderer is not None
                try:
                    out.append(renderer.render_conversation(messages, renderer.parse_tools(tools)))
                except Exception:  # e.g. a hub template's raise_exception on role order
                    out.append(None)
            else:
                out.append(text or "")
        return out


class PretrainProcessor(Processor):
    """`pt`: every token is trained. Documents get the tokenizer's own special tokens plus eos (so
    packed documents are separated); conversations are rendered with the chat template. Unpacked
    rows are truncated to `max_length`; with packing the packer cuts the stream into chunks."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        renderer = ChatRenderer(self.tokenizer) if any(batch["messages"]) else None
        tok = self.tokenizer
        texts = [t for t in self._texts(batch, renderer) if t is not None]
        plain = tok(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []
        eos = tok.eos_token_id
        limit = None if self.cfg.extra.get("packing") else self.cfg.max_length
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
        for ids in plain:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            truncated = limit is not None and len(ids) > limit
            if truncated:
                ids = ids[:limit]
            out["input_ids"].append(ids)
            out["labels"].append(list(ids))
            out["truncated"].append(truncated)
        return out


class SupervisedProcessor(Processor):
    """`sft`: conversations are trained on assistant turns only (all of them, eos included);
    with `maskPrompt: false` on every token; plain-text rows on every token. Rows left with no
    trained token (no assistant turn, or nothing survived truncation) are dropped."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        renderer = ChatRenderer(tok)
        pieces: list[str] = []  # every row's text pieces, flattened for one tokenizer call
        layout: list[list[bool]] = []  # per row: whether each of its pieces is trained
        for messages, tools, text in zip(batch["messages"], batch["tools"], batch["text"], strict=True):
            if not messages:  # plain text in an sft run: a document, trained on fully, ending with eos
                pieces.append((text or "") + (tok.eos_token or ""))
                layout.append([True])
                continue
            try:
                full, spans = renderer.spans(messages, tools)
            except Exception:  # the template rejects this conversation: dropped and counted
                continue
            if not self.cfg.mask_prompt:
                spans = [(0, len(full))]
            trained, cursor = [], 0
            for start, end in spans:
                if start > cursor:
                    pieces.append(full[cursor:start])
                    trained.append(False)
                if end > start:
                    pieces.append(full[start:end])
                    trained.append(True)
                cursor = max(cursor, end)
            if cursor < len(full):
                pieces.append(full[cursor:])
                trained.append(False)
            layout.append(trained)
        encoded = tok(pieces, add_special_tokens=False, verbose=False)["input_ids"] if pieces else []
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
        bos = tok.bos_token_id
        position = 0
        for trained in layout:
            ids: list[int] = []
            labels: list[int] = []
            n_trained = 0
            for is_trained in trained:
                piece = encoded[position]
                position += 1
                ids += piece
                if is_trained:
                    labels += piece
                    n_trained += len(piece)
                else:
                    labels += [IGNORE_INDEX] * len(piece)
            truncated = len(ids) > self.cfg.max_length
            if truncated:
                ids_arr, labels_arr = truncate(np.asarray(ids), np.asarray(labels), self.cfg, bos)
                ids, labels = ids_arr.tolist(), labels_arr.tolist()
                n_trained = sum(label != IGNORE_INDEX for label in labels)
            if n_trained == 0:
                continue  # nothing to learn from: dropped (counted by the caller)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
        return out


def check_template(tokenizer: Any, rows: Iterable[dict[str, Any]], *, field: str = "data.template") -> None:
    """Render the first conversation among `rows` in this process, so a chat template that
    rejects the data (hub templates often `raise_exception` on a system role or on turns that do
    not alternate) is reported against the spec instead of as a worker traceback; later rows
    that fail are dropped and counted."""
    renderer = None
    for row in rows:
        messages = first_conversation(row)
        if not messages:
            continue
        renderer = renderer or ChatRenderer(tokenizer)
        try:
            renderer.spans(messages, row["tools"])
        except Exception as exc:
            raise SpecError(
                field,
                f"the chat template cannot render the first conversation ({type(exc).__name__}: {exc}).",
                "use a template that accepts these roles (e.g. `default` or `chatml`), or fix the data.",
            ) from exc
        return


def split_prompt(renderer: ChatRenderer, prompt: list[dict[str, str]], answer: list[dict[str, str]], tools: Any) -> tuple[str, str]:
    """(prompt text, answer text) of a conversation: the prompt exactly as inference renders it
    (generation prompt included), the answer the rest of the rendered conversation (through its
    end-of-turn/eos). Falls back to the common prefix for templates that are not prefix-stable."""
    prompt_text = renderer.render(prompt, tools, add_generation_prompt=True)
    full = renderer.render_conversation(prompt + answer, tools)
    cut = len(prompt_text) if full.startswith(prompt_text) else _common_prefix(prompt_text, full)
    return full[:cut], full[cut:]


def fit_pair(prompt: list[int], answers: list[list[int]], cfg: ProcessorConfig, bos_id: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + the longest answer into `max_length`: answers keep at least
    `min_response_share` of it (cut at the end), the prompt keeps its last tokens (after bos)."""
    limit = cfg.max_length
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= limit:
        return prompt, answers, False
    keep_answer = min(longest, max(limit - len(prompt), int(limit * cfg.min_response_share)))
    keep_prompt = limit - keep_answer
    head = 1 if bos_id is not None and prompt and prompt[0] == bos_id and keep_prompt > 1 else 0
    prompt = prompt[:head] + prompt[len(prompt) - (keep_prompt - head):] if keep_prompt > head else prompt[:keep_prompt]
    return prompt, [a[:keep_answer] for a in answers], True


class PairwiseProcessor(Processor):
    """`rm`/`dpo`: a preference pair -> `prompt_ids`, `chosen_ids`, `rejected_ids` (the answers
    without the prompt). Prompt and answers are tokenized separately, like the SFT masking, so
    the prompt tokens are exactly the ones inference produces. Pairs whose answers are identical
    or empty after templating are dropped."""

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        renderer = ChatRenderer(tok)
        texts: list[tuple[str, str, str]] = []
        for prompt, chosen, rejected, tools in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["tools"], strict=True):
            tools_value = renderer.parse_tools(tools)
            try:
                prompt_text, chosen_text = split_prompt(renderer, prompt, chosen, tools_value)
                _, rejected_text = split_prompt(renderer, prompt, rejected, tools_value)
            except Exception:  # the template rejects this conversation: dropped and counted
                continue
            if chosen_text.strip() and rejected_text.strip() and chosen_text != rejected_text:
                texts.append((prompt_text, chosen_text, rejected_text))
        flat = [t for triple in texts for t in triple]
        encoded = tok(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
        out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": []}
        for i in range(len(texts)):
            prompt_ids, (chosen_ids, rejected_ids), truncated = fit_pair(
                encoded[3 * i], [encoded[3 * i + 1], encoded[3 * i + 2]], self.cfg, tok.bos_token_id
            )
            out["prompt_ids"].append(prompt_ids)
            out["chosen_ids"].append(chosen_ids)
            out["rejected_ids"].append(rejected_ids)
            out["truncated"].append(truncated)
        return out


class UnpairedProcessor(Processor):
    """Unpaired preferences -> `prompt_ids`, `completion_ids`, `label`."""

    columns = ("prompt_ids", "completion_ids", "label")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        renderer = ChatRenderer(tok)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": [], "truncated": []}
        for prompt, completion, label, tools in zip(batch["prompt"], batch["completion"], batch["label"], batch["tools"], strict=True):
            try:
                prompt_text, completion_text = split_prompt(renderer, prompt, completion, renderer.parse_tools(tools))
            except Exception:
                continue
            if not completion_text.strip():
                continue
            ids = tok([prompt_text, completion_text], add_special_tokens=False, verbose=False)["input_ids"]
            prompt_ids, (completion_ids,), truncated = fit_pair(ids[0], [ids[1]], self.cfg, tok.bos_token_id)
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(completion_ids)
            out["label"].append(bool(label))
            out["truncated"].append(truncated)
        return out


class PromptProcessor(Processor):
    """For the generating stages (ppo, raft, grpo): conversations -> prompts to generate from. The prompt is everything before
    the last assistant turn (or the whole conversation when it ends with a user turn); that turn's
    text is kept as `reference` for reward functions. Outputs `prompt` (the rendered text, with the
    generation prompt), `prompt_ids`, `prompt_messages` (JSON) and `reference`."""

    columns = ("prompt", "prompt_ids", "prompt_messages", "reference")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        renderer = ChatRenderer(tok)
        out: dict[str, list] = {name: [] for name in (*self.columns, "truncated")}
        for messages, tools in zip(batch["messages"], batch["tools"], strict=True):
            if not messages:
                continue  # plain text has no prompt to answer
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                prompt, reference = list(messages), None
            else:
                prompt, reference = messages[:last], messages[last]["content"]
            if not prompt or prompt[-1]["role"] == "assistant":
                continue
            try:
                text = renderer.render(prompt, renderer.parse_tools(tools), add_generation_prompt=True)
            except Exception:
                continue
            ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
            truncated = len(ids) > self.cfg.max_length
            if truncated:  # keep the end of the prompt: the question and the assistant header
                ids = ids[len(ids) - self.cfg.max_length:]
                text = tok.decode(ids)
            out["prompt"].append(text)
            out["prompt_ids"].append(ids)
            out["prompt_messages"].append(json.dumps(prompt, ensure_ascii=False))
            out["reference"].append(reference)
            out["truncated"].append(truncated)
        return out


PROCESSORS: dict[str, type[Processor]] = {
    "pt": PretrainProcessor,
    "sft": SupervisedProcessor,
    "rm": PairwiseProcessor,
    "dpo": PairwiseProcessor,
    "kto": UnpairedProcessor,
    "ppo": PromptProcessor,
    "raft": PromptProcessor,
    "grpo": PromptProcessor,
}
"""Stage -> processor class."""

STAGE_DATA: dict[str, str] = {"pt": "chat", "sft": "chat", "rm": "pairwise", "dpo": "pairwise", "kto": "unpaired",
                              "ppo": "chat", "raft": "chat", "grpo": "chat"}
"""Stage -> the kind of data it trains on (`chat`, `pairwise`, `unpaired`; see aligners.DATA_KINDS)."""
LM_STAGES = ("pt", "sft")
"""Stages whose rows are `input_ids`/`labels` (packed or not); the others have their own columns."""


def first_conversation(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation of an internal-form row of any kind, for checking the template on."""
    if row.get("messages"):
        return row["messages"]
    if row.get("prompt"):
        answer = row.get("chosen") or row.get("completion") or []
        return list(row["prompt"]) + list(answer)
    return None


def processor_config(spec: TrainingSpec) -> ProcessorConfig:
    """What the stage's processor is given (also part of the tokenized-dataset cache key)."""
    return ProcessorConfig(
        max_length=spec.data.maxLength, mask_prompt=spec.data.maskPrompt, extra={"packing": spec.packing_enabled}
    )
