"""Aligners: turn each supported dataset format into ONE internal form.

Every later step (mixing, templates, tokenization, masking) sees only these columns:

- `messages`: a conversation, `[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]`
  (empty for plain text),
- `tools`: the tool/function definitions offered in the conversation, as a JSON string, or null,
- `text`: a plain-text document, or null for conversations.

A row is a conversation when `messages` is non-empty, else plain text. Keeping one schema for
both lets a run mix chat and plain-text sources. Each format is one `Aligner` in `ALIGNERS`; a new
format (e.g. pairwise preference data for rm/dpo) adds an aligner with its own output features
and a processor for its stage, without touching the existing ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
from datasets import Features, Value

from kubetune.trainer.data.loader import LoadedSource
from kubetune.trainer.errors import SpecError
from kubetune.trainer.spec import ColumnMap, DatasetSpec

ROLES = ("system", "user", "assistant", "tool")
CHAT_FEATURES = Features(
    {
        "messages": datasets.List({"role": Value("string"), "content": Value("string")}),
        "tools": Value("string"),
        "text": Value("string"),
    }
)
"""Schema of the internal form every aligner produces."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}
"""ShareGPT `from` values (and OpenAI-style `role` values) -> internal roles. A `function_call`
turn is the assistant calling a tool (its content is the call), an `observation` the tool's result."""


class InvalidRow(ValueError):
    """One example does not fit its format; it is skipped and counted (the first one is an error)."""


def _text(value: Any) -> str:
    """A cell as text: strings as-is, OpenAI content parts joined, numbers stringified."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text") or "" if isinstance(part, dict) else str(part) for part in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _tools(value: Any) -> str | None:
    if value is None or value == "" or value == []:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _chat(messages: list[dict[str, str]], tools: str | None = None) -> dict[str, Any]:
    return {"messages": messages, "tools": tools, "text": None}


@dataclass
class Aligner:
    """One source format. Subclasses name their columns and convert one row."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Role -> candidate column names, first present wins (`columns.<role>` overrides)."""
    required: ClassVar[tuple[str, ...]] = ()
    features: ClassVar[Features] = CHAT_FEATURES

    def detect(self, source: LoadedSource, columns: ColumnMap) -> bool:
        """Whether data with these columns looks like this format (used by `format: auto`)."""
        try:
            self.resolve(source, columns, field="")
        except SpecError:
            return False
        return True

    def resolve(self, source: LoadedSource, columns: ColumnMap, *, field: str) -> dict[str, str | None]:
        """Role -> actual column name (None when an optional column is absent)."""
        present = set(source.columns)
        resolved: dict[str, str | None] = {}
        for role, candidates in self.defaults.items():
            mapped = getattr(columns, role, None)
            options = (mapped,) if mapped else candidates
            resolved[role] = next((c for c in options if c in present), None)
        missing = [role for role in self.required if resolved.get(role) is None]
        if missing:
            wanted = ", ".join(
                "/".join((getattr(columns, r, None),) if getattr(columns, r, None) else self.defaults[r])
                for r in missing
            )
            raise SpecError(
                f"{field}.format",
                f"format {self.name!r} needs column(s) {wanted}, but the data has {sorted(present)}.",
                "set the right `format` (or `auto`), or map the columns with `columns`.",
            )
        return resolved

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        """One raw row -> the internal form; raises InvalidRow."""
        raise NotImplementedError


class TextAligner(Aligner):
    """`{"text": "..."}`: plain documents (continued pretraining, or trained on fully in sft)."""

    name = "text"
    defaults = {"text": ("text",)}
    required = ("text",)

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        text = _text(row.get(cols["text"]))
        if not text.strip():
            raise InvalidRow(f"column {cols['text']!r} is empty")
        return {"messages": [], "tools": None, "text": text}


class AlpacaAligner(Aligner):
    """`{"instruction", "input", "output", "system"?, "history"?}`; history = [[prompt, response], ...]
    earlier turns. The user turn is the instruction, then the input on a new line."""

    name = "alpaca"
    defaults = {
        "instruction": ("instruction",),
        "input": ("input",),
        "output": ("output",),
        "system": ("system",),
        "history": ("history",),
    }
    required = ("instruction", "output")

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        def get(role: str) -> Any:
            return row.get(cols[role]) if cols.get(role) else None

        output = get("output")
        if output is None or isinstance(output, list | dict):
            raise InvalidRow(f"`output` must be a string, got {type(output).__name__}")
        prompt = "\n".join(part for part in (_text(get("instruction")), _text(get("input"))) if part)
        if not prompt.strip():
            raise InvalidRow("`instruction` and `input` are both empty")
        messages = []
        system = _text(get("system"))
        if system:
            messages.append({"role": "system", "content": system})
        history = get("history") or []
        if not isinstance(history, list):
            raise InvalidRow("`history` must be a list of [prompt, response] pairs")
        for pair in history:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise InvalidRow("`history` must be a list of [prompt, response] pairs")
            messages.append({"role": "user", "content": _text(pair[0])})
            messages.append({"role": "assistant", "content": _text(pair[1])})
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": _text(output)})
        return _chat(messages)


class ShareGPTAligner(Aligner):
    """`{"conversations": [{"from": "human", "value": ...}, ...], "system"?, "tools"?}`, also with
    `role`/`content` keys (OpenAI messages) and a `messages` column."""

    name = "sharegpt"
    defaults = {"messages": ("conversations", "messages"), "system": ("system",), "tools": ("tools",)}
    required = ("messages",)

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        turns = row.get(cols["messages"])
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except ValueError:
                raise InvalidRow(f"column {cols['messages']!r} is a string, not a list of turns") from None
        if not isinstance(turns, list) or not turns:
            raise InvalidRow(f"column {cols['messages']!r} must be a non-empty list of turns")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise InvalidRow("each turn must be an object with from/value or role/content")
            speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
            if speaker is None:
                raise InvalidRow("a turn has neither `from` nor `role`")
            role = SHAREGPT_ROLES.get(str(speaker).lower())
            if role is None:
                raise InvalidRow(f"unknown speaker {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
            content = turn.get("value") if turn.get("value") is not None else turn.get("content")
            messages.append({"role": role, "content": _text(content)})
        system = _text(row.get(cols["system"])) if cols.get("system") else ""
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        tools = _tools(row.get(cols["tools"])) if cols.get("tools") else None
        return _chat(messages, tools)


class LMFlowAligner(Aligner):
    """LMFlow files: `{"type": "text_only", "instances": [{"text"}]}` -> text;
    `{"type": "text2text", "instances": [{"input", "output"}]}` -> one user/assistant exchange."""

    name = "lmflow"

    def detect(self, source: LoadedSource, columns: ColumnMap) -> bool:
        return source.lmflow_type is not None

    def resolve(self, source: LoadedSource, columns: ColumnMap, *, field: str) -> dict[str, str | None]:
        if source.lmflow_type is None:
            raise SpecError(
                f"{field}.format",
                'format "lmflow" needs LMFlow .json files ({"type": "text_only"|"text2text", "instances": [...]}), '
                f"but the data is rows with columns {sorted(source.columns)}.",
                "set the right `format` (or `auto`).",
            )
        if source.lmflow_type == "text_only":
            needed = {"text": columns.text or "text"}
        else:
            needed = {"input": columns.input or "input", "output": columns.output or "output"}
        missing = [c for c in needed.values() if c not in source.columns]
        if missing:
            raise SpecError(
                f"{field}.format",
                f"LMFlow {source.lmflow_type} instances need key(s) {missing}, found {sorted(source.columns)}.",
                "fix the instances or map the keys with `columns`.",
            )
        return {"type": source.lmflow_type, **needed}

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        if cols["type"] == "text_only":
            return TextAligner().align_row(row, {"text": cols["text"]})
        prompt, output = row.get(cols["input"]), row.get(cols["output"])
        if prompt is None or output is None:
            raise InvalidRow("text2text instances need `input` and `output`")
        return _chat(
            [{"role": "user", "content": _text(prompt)}, {"role": "assistant", "content": _text(output)}]
        )


ALIGNERS: dict[str, Aligner] = {
    a.name: a for a in (LMFlowAligner(), ShareGPTAligner(), AlpacaAligner(), TextAligner())
}
"""Known formats; `format: auto` tries them in this order (most specific first)."""


def detect_format(source: LoadedSource, columns: ColumnMap, *, field: str) -> str:
    """The first format whose columns are present, or a SpecError listing what was found."""
    for name, aligner in ALIGNERS.items():
        if aligner.detect(source, columns):
            return name
    raise SpecError(
        f"{field}.format",
        f"cannot detect the format of data with columns {sorted(source.columns)}.",
        "set `format` (text: `text`; alpaca: `instruction`/`output`; sharegpt: `conversations`), "
        "or map your column names with `columns`.",
    )


def _check_column_map(source: LoadedSource, columns: ColumnMap, *, field: str) -> None:
    present = set(source.columns)
    for role, name in columns.model_dump().items():
        if name is not None and name not in present:
            raise SpecError(
                f"{field}.columns.{role}",
                f"column {name!r} is not in the data (columns: {sorted(present)}).",
                "use one of the data's column names, or remove the mapping.",
            )


def _batch_fn(aligner: Aligner, cols: dict[str, str | None]) -> Callable[[dict[str, list]], dict[str, list]]:
    def align_batch(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in aligner.features}
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            try:
                row = aligner.align_row(dict(zip(keys, values, strict=True)), cols)
            except InvalidRow:
                continue
            for name in out:
                out[name].append(row[name])
        return out

    return align_batch


def _row_fn(aligner: Aligner, cols: dict[str, str | None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    empty = {"messages": [], "tools": None, "text": None}

    def align_one(row: dict[str, Any]) -> dict[str, Any]:
        try:
            return aligner.align_row(row, cols)
        except InvalidRow:
            return empty

    return align_one


def align_source(
    source: LoadedSource, spec: DatasetSpec, *, field: str
) -> tuple[datasets.Dataset | datasets.IterableDataset, dict[str, Any]]:
    """Align one loaded source; returns the internal-form dataset and its stats.

    Rows that do not fit the format are skipped and counted (`invalid`), but the first row must
    fit: a format that does not match the data at all is a spec error, not a silent empty set.
    """
    _check_column_map(source, spec.columns, field=field)
    name = detect_format(source, spec.columns, field=field) if spec.format == "auto" else spec.format
    aligner = ALIGNERS[name]
    cols = aligner.resolve(source, spec.columns, field=field)
    try:
        aligner.align_row(source.first_row, cols)
    except InvalidRow as exc:
        raise SpecError(
            f"{field}.format",
            f"the first example does not fit format {name!r}: {exc}.",
            "set the right `format` (or `auto`), or fix the data.",
        ) from exc

    stats: dict[str, Any] = {"path": spec.path, "format": name}
    data = source.dataset
    if isinstance(data, datasets.Dataset):
        before = len(data)
        data = data.map(
            _batch_fn(aligner, cols),
            batched=True,
            batch_size=1000,
            remove_columns=data.column_names,
            features=aligner.features,
            keep_in_memory=True,
            new_fingerprint=f"{data._fingerprint}-align-{name}",
            desc=f"Aligning {spec.path} ({name})",
        )
        stats.update(rows=len(data), invalid=before - len(data))
        if len(data) == 0:
            raise SpecError(
                f"{field}.path",
                f"no example of {spec.path!r} fits format {name!r}.",
                "fix the data or `format`.",
            )
    else:
        data = data.map(_row_fn(aligner, cols)).select_columns(list(aligner.features))
        data = data.cast(aligner.features).filter(
            lambda row: bool(row["messages"]) or row["text"] is not None
        )
        stats.update(rows=None, invalid=None)
    return data, stats
