"""A synthetic preference task built on the demo task (`kubetune.trainer.train.demo`).

Every demo example becomes a pair: `chosen` is the correct answer, `rejected` the same sentence
with a wrong fact (a wrong sum, another word's antonym, another country's capital). The wrong
answer is fixed per fact, so, like the SFT demo, a held-out pair asks a known fact in a new
wording: a reward model must learn which answers are right, and a policy that prefers the chosen
answers is a policy that knows the facts. `python -m kubetune.trainer.train.data.demo_preferences DIR` writes
`demo_preferences.jsonl`; `as_hh` gives the same pairs as HH-RLHF dialogues.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from kubetune.trainer.train.demo import ANTONYMS, CAPITALS, NUMBERS, demo_examples

SUM = re.compile(r"^(\d) plus (\d) is (\d), (\w+)\.$")
OPPOSITE = re.compile(r"^The opposite of (\w+) is (\w+)\.$")
CAPITAL = re.compile(r"^The capital of (\w+) is (\w+)\.$")


def wrong_answer(output: str, rng: random.Random) -> str:
    """The demo answer with its fact replaced by a plausible wrong one."""
    if match := SUM.match(output):
        a, b, total = int(match[1]), int(match[2]), int(match[3])
        wrong = rng.choice([n for n in range(10) if n != total])
        return f"{a} plus {b} is {wrong}, {NUMBERS[wrong]}."
    if match := OPPOSITE.match(output):
        wrong = rng.choice(sorted({v for v in ANTONYMS.values() if v != match[2]}))
        return f"The opposite of {match[1]} is {wrong}."
    if match := CAPITAL.match(output):
        wrong = rng.choice(sorted(v for v in CAPITALS.values() if v != match[2]))
        return f"The capital of {match[1]} is {wrong}."
    raise ValueError(f"not a demo answer: {output!r}")


def demo_preferences(seed: int = 0) -> list[dict[str, str]]:
    """`{"instruction", "chosen", "rejected"}` for every demo example (format `preference`)."""
    return [
        {
            "instruction": row["instruction"],
            "chosen": row["output"],
            "rejected": wrong_answer(row["output"], random.Random(f"{seed}:{row['output']}")),
        }
        for row in demo_examples(seed)
    ]


def as_hh(row: dict[str, str]) -> dict[str, str]:
    """The same pair as two HH-RLHF transcripts sharing the prompt."""
    prefix = f"\n\nHuman: {row['instruction']}\n\nAssistant: "
    return {"chosen": prefix + row["chosen"], "rejected": prefix + row["rejected"]}


def write_files(directory: str | Path, *, hh: bool = False) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = demo_preferences()
    pairs = directory / "demo_preferences.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not hh:
        return [pairs]
    dialogues = directory / "demo_hh.jsonl"
    dialogues.write_text("".join(json.dumps(as_hh(r)) + "\n" for r in rows))
    return [pairs, dialogues]


if __name__ == "__main__":
    for written in write_files(sys.argv[1] if len(sys.argv) > 1 else "examples/data"):
        print(written)
