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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
from datasets import Features, Value

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import ColumnMap, DatasetSpec
from kubetune.trainer.train.data.loader import LoadedSource

ROLES = ("system", "user", "assistant", "tool")
CHAT_FEATURES = Features(
    {
        "messages": datasets.List({"role": Value("string"), "content": Value("string")}),
        "tools": Value("string"),
        "text": Value("string"),
    }
)
"""Schema of the internal form every chat/text aligner produces."""

MESSAGES = datasets.List({"role": Value("string"), "content": Value("string")})
PREFERENCE_FEATURES = Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES, "tools": Value("string")})
"""Internal form of pairwise preference data (`rm`, `dpo`): the prompt turns (ending with a user
or tool turn), then the preferred and the dispreferred continuation (one or more turns, the first
an assistant turn)."""
UNPAIRED_FEATURES = Features({"prompt": MESSAGES, "completion": MESSAGES, "label": Value("bool"), "tools": Value("string")})
"""Internal form of unpaired (KTO-style) preference data: one continuation and whether it is
desirable."""

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


def _turn(turn: Any) -> dict[str, str]:
    """One ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turn -> an internal message."""
    if not isinstance(turn, dict):
        raise InvalidRow("each turn must be an object with from/value or role/content")
    speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
    if speaker is None:
        raise InvalidRow("a turn has neither `from` nor `role`")
    role = SHAREGPT_ROLES.get(str(speaker).lower())
    if role is None:
        raise InvalidRow(f"unknown speaker {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
    content = turn.get("value") if turn.get("value") is not None else turn.get("content")
    return {"role": role, "content": _text(content)}


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
        messages = [_turn(turn) for turn in turns]
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


# --- Preference data (rm, dpo) -------------------------------------------------------------------

HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|System):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def _maybe_json_turns(value: Any) -> Any:
    """Turns stored as a JSON string (CSV/Parquet exports) are decoded; other strings stay text."""
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, dict) or (isinstance(decoded, list) and decoded and all(isinstance(t, dict) for t in decoded)):
            return decoded
    return value


def _turns(value: Any, default_role: str, what: str) -> list[dict[str, str]]:
    """A cell holding a string (one turn of `default_role`), a turn object, or a list of turns."""
    value = _maybe_json_turns(value)
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRow(f"`{what}` is empty")
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_turn(value)]
    if isinstance(value, list) and value:
        return [_turn(turn) for turn in value]
    raise InvalidRow(f"`{what}` must be a string, a turn or a non-empty list of turns, got {type(value).__name__}")


def _prompt_turns(row: dict[str, Any], cols: dict[str, str | None]) -> list[dict[str, str]]:
    """The prompt of a preference row: a string (plus `input` on a new line) or a list of turns,
    with an optional `system` column; it must not end with an assistant turn."""
    value = _maybe_json_turns(row.get(cols["prompt"]) if cols.get("prompt") else None)
    extra = _text(row.get(cols["input"])) if cols.get("input") else ""
    if isinstance(value, str):
        text = "\n".join(part for part in (value, extra) if part)
        if not text.strip():
            raise InvalidRow("the prompt is empty")
        messages = [{"role": "user", "content": text}]
    else:
        messages = _turns(value, "user", cols.get("prompt") or "prompt")
    system = _text(row.get(cols["system"])) if cols.get("system") else ""
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if messages[-1]["role"] == "assistant":
        raise InvalidRow("the prompt ends with an assistant turn (the answers belong in chosen/rejected)")
    return messages


def _answer(value: Any, what: str) -> list[dict[str, str]]:
    turns = _turns(value, "assistant", what)
    if turns[0]["role"] != "assistant":
        raise InvalidRow(f"`{what}` must start with an assistant turn, not {turns[0]['role']!r}")
    return turns


def parse_hh(text: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) -> turns."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise InvalidRow("an HH-RLHF dialogue must be `Human: ...` / `Assistant: ...` turns")
    return [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


class PreferenceAligner(Aligner):
    """Pairwise preferences: `{"prompt"|"instruction"(+"input")|"conversations", "chosen",
    "rejected", "system"?}`. The prompt is a string or a list of ShareGPT/OpenAI turns; `chosen`
    and `rejected` are strings (one assistant answer), turn objects or lists of turns
    (LlamaFactory's sharegpt ranking format, TRL's conversational format)."""

    name = "preference"
    defaults = {
        "prompt": ("prompt", "instruction", "question", "conversations", "messages"),
        "input": ("input",),
        "system": ("system",),
        "chosen": ("chosen",),
        "rejected": ("rejected",),
        "tools": ("tools",),
    }
    required = ("prompt", "chosen", "rejected")
    features = PREFERENCE_FEATURES

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        prompt = _prompt_turns(row, cols)
        chosen = _answer(row.get(cols["chosen"]), "chosen")
        rejected = _answer(row.get(cols["rejected"]), "rejected")
        tools = _tools(row.get(cols["tools"])) if cols.get("tools") else None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools}


class HHAligner(Aligner):
    """HH-RLHF style: `{"chosen": dialogue, "rejected": dialogue}`, two whole conversations that
    share a prefix (Anthropic's `\\n\\nHuman:`/`\\n\\nAssistant:` transcripts, or lists of turns, i.e.
    TRL's implicit-prompt format). The shared turns become the prompt; the answers start at the
    first assistant turn where the two differ."""

    name = "hh"
    defaults = {"chosen": ("chosen",), "rejected": ("rejected",), "tools": ("tools",)}
    required = ("chosen", "rejected")
    features = PREFERENCE_FEATURES

    @staticmethod
    def _dialogue(value: Any, what: str) -> list[dict[str, str]]:
        value = _maybe_json_turns(value)
        if isinstance(value, str) and HH_TURN.search(value):
            return parse_hh(value)
        return _turns(value, "assistant", what)

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        chosen = self._dialogue(row.get(cols["chosen"]), "chosen")
        rejected = self._dialogue(row.get(cols["rejected"]), "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        split = min(shared, len(chosen) - 1, len(rejected) - 1)
        while split > 0 and not (chosen[split]["role"] == rejected[split]["role"] == "assistant"):
            split -= 1
        if split == 0 or chosen[split:] == rejected[split:]:
            raise InvalidRow("the two dialogues share no prompt, or do not differ in an assistant turn")
        tools = _tools(row.get(cols["tools"])) if cols.get("tools") else None
        return {"prompt": chosen[:split], "chosen": chosen[split:], "rejected": rejected[split:], "tools": tools}


class UnpairedAligner(Aligner):
    """Unpaired (KTO-style) preferences: `{"prompt", "completion", "label": bool}`."""

    name = "unpaired"
    defaults = {
        "prompt": ("prompt", "instruction", "question", "conversations", "messages"),
        "input": ("input",),
        "system": ("system",),
        "completion": ("completion", "response", "output"),
        "label": ("label", "kto_tag"),
        "tools": ("tools",),
    }
    required = ("prompt", "completion", "label")
    features = UNPAIRED_FEATURES

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        label = row.get(cols["label"])
        if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            label = label.strip().lower() in ("true", "1", "yes")
        if not isinstance(label, bool | int) or (isinstance(label, int) and label not in (0, 1)):
            raise InvalidRow(f"`label` must be a boolean, got {label!r}")
        return {
            "prompt": _prompt_turns(row, cols),
            "completion": _answer(row.get(cols["completion"]), "completion"),
            "label": bool(label),
            "tools": _tools(row.get(cols["tools"])) if cols.get("tools") else None,
        }


class UnpairedFromPairs(Aligner):
    """Pairwise data for a stage that trains on unpaired judgements (kto): each pair becomes two
    rows, the chosen answer labelled desirable and the rejected one not (TRL's
    `unpair_preference_dataset`). Format names and columns are the pairwise format's own."""

    features = UNPAIRED_FEATURES

    def __init__(self, pairwise: Aligner):
        self.pairwise = pairwise
        self.name = pairwise.name  # type: ignore[misc]
        self.defaults = pairwise.defaults  # type: ignore[misc]
        self.required = pairwise.required  # type: ignore[misc]

    def align_row(self, row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any]:
        return self.align_rows(row, cols)[0]

    def align_rows(self, row: dict[str, Any], cols: dict[str, str | None]) -> list[dict[str, Any]]:
        pair = self.pairwise.align_row(row, cols)
        return [{"prompt": pair["prompt"], "completion": pair[answer], "label": answer == "chosen", "tools": pair["tools"]}
                for answer in ("chosen", "rejected")]


ALIGNERS: dict[str, Aligner] = {
    a.name: a for a in (LMFlowAligner(), ShareGPTAligner(), AlpacaAligner(), TextAligner())
}
"""Chat/text formats; `format: auto` tries them in this order (most specific first)."""

PREFERENCE_ALIGNERS: dict[str, Aligner] = {a.name: a for a in (PreferenceAligner(), HHAligner())}
"""Pairwise preference formats (stages rm, dpo), in `auto` order."""
UNPAIRED_ALIGNERS: dict[str, Aligner] = {
    a.name: a for a in (UnpairedAligner(), *(UnpairedFromPairs(p) for p in PREFERENCE_ALIGNERS.values()))
}
"""Unpaired formats (stage kto), in `auto` order: unpaired rows, or pairs split in two."""

DATA_KINDS: dict[str, dict[str, Aligner]] = {
    "chat": ALIGNERS,
    "pairwise": PREFERENCE_ALIGNERS,
    "unpaired": UNPAIRED_ALIGNERS,
}
"""What a stage trains on -> the formats that can provide it."""
KIND_NEEDS = {
    "pairwise": "pairwise preference data: `chosen` and `rejected` answers plus a prompt "
    "(`prompt`/`instruction`/`conversations`) — format `preference` — or two whole dialogues "
    "`chosen`/`rejected` — format `hh`",
    "unpaired": "unpaired preference data: `prompt`, `completion` and a boolean `label` (format `unpaired`), "
    "or pairwise data (formats `preference`, `hh`), split into a desirable and an undesirable answer",
}


def detect_format(source: LoadedSource, columns: ColumnMap, *, field: str, kind: str = "chat") -> str:
    """The first format whose columns are present, or a SpecError listing what was found."""
    for name, aligner in DATA_KINDS[kind].items():
        if aligner.detect(source, columns):
            return name
    if kind != "chat":
        raise SpecError(
            f"{field}.format",
            f"this stage needs {KIND_NEEDS[kind]}, but the data has columns {sorted(source.columns)}.",
            "add the missing column(s), or map your column names with `columns` (e.g. columns.rejected).",
        )
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
            raw = dict(zip(keys, values, strict=True))
            try:
                rows = aligner.align_rows(raw, cols) if isinstance(aligner, UnpairedFromPairs) else [aligner.align_row(raw, cols)]
            except InvalidRow:
                continue
            for row in rows:
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
    source: LoadedSource, spec: DatasetSpec, *, field: str, kind: str = "chat"
) -> tuple[datasets.Dataset | datasets.IterableDataset, dict[str, Any]]:
    """Align one loaded source; returns the internal-form dataset and its stats.

    `kind` is what the stage trains on (`chat`, `pairwise`, `unpaired`); only formats of that kind
    are accepted. Rows that do not fit the format are skipped and counted (`invalid`), but the
    first row must fit: a format that does not match the data at all is a spec error, not a
    silent empty set.
    """
    _check_column_map(source, spec.columns, field=field)
    name, aligner, cols = _source_aligner(source, spec, field=field, kind=kind)
    stats: dict[str, Any] = {"path": spec.path, "format": name}
    if source.lmflow_type is not None and name == "lmflow":
        stats["lmflowType"] = source.lmflow_type  # text2text and text_only render differently by default
    if isinstance(source.dataset, datasets.Dataset):
        data, counts = _align_in_memory(source.dataset, aligner, cols, spec, name=name, field=field)
    else:
        if kind != "chat":
            raise SpecError("data.streaming", "preference data cannot be streamed.", "set data.streaming: false.")
        data = source.dataset.map(_row_fn(aligner, cols)).select_columns(list(aligner.features))
        data = data.cast(aligner.features).filter(
            lambda row: bool(row["messages"]) or row["text"] is not None
        )
        counts = {"rows": None, "invalid": None}
    stats.update(counts)
    return data, stats


def _source_aligner(source: LoadedSource, spec: DatasetSpec, *, field: str,
                    kind: str) -> tuple[str, Aligner, dict[str, str | None]]:
    """(format name, aligner, resolved columns) of a source: its format (detected when `auto`)
    must fit the stage's kind and its first row must fit the format."""
    name = detect_format(source, spec.columns, field=field, kind=kind) if spec.format == "auto" else spec.format
    if name not in DATA_KINDS[kind]:
        wanted = KIND_NEEDS.get(kind, "conversations or text (formats " + ", ".join(ALIGNERS) + ")")
        raise SpecError(
            f"{field}.format",
            f"format {name!r} does not fit this stage, which needs {wanted}.",
            f"use one of: {', '.join(DATA_KINDS[kind])} (or auto).",
        )
    aligner = DATA_KINDS[kind][name]
    cols = aligner.resolve(source, spec.columns, field=field)
    try:
        aligner.align_row(source.first_row, cols)
    except InvalidRow as exc:
        raise SpecError(
            f"{field}.format",
            f"the first example does not fit format {name!r}: {exc}.",
            "set the right `format` (or `auto`), or fix the data.",
        ) from exc
    return name, aligner, cols


def _align_in_memory(data: datasets.Dataset, aligner: Aligner, cols: dict[str, str | None], spec: DatasetSpec, *,
                     name: str, field: str) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Align an in-memory dataset in batches: (aligned rows, {rows, invalid}); none fitting is a
    spec error."""
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
    produced = len(data) // 2 if isinstance(aligner, UnpairedFromPairs) else len(data)  # two rows per pair
    if len(data) == 0:
        raise SpecError(
            f"{field}.path",
            f"no example of {spec.path!r} fits format {name!r}.",
            "fix the data or `format`.",
        )
    return data, {"rows": len(data), "invalid": before - produced}
