"""The demo task: small, deterministic instruction data a tiny model learns in a minute.

Three templated skills (antonyms, single-digit addition, capitals) phrased several ways, so the
held-out split asks known facts in new wordings: eval loss falls only if the model learns the
mapping, not just the token distribution. `python -m kubetune.trainer.train.demo DIR` writes the files
shipped in `examples/data/`; the built-in tiny tokenizer is trained on the same text.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "early": "late", "open": "closed", "full": "empty", "hard": "soft", "rich": "poor",
    "young": "old", "wet": "dry", "loud": "quiet", "strong": "weak", "high": "low", "near": "far",
    "thick": "thin", "clean": "dirty", "new": "used", "long": "short", "heavy": "light",
    "sharp": "dull", "brave": "afraid", "deep": "shallow", "wide": "narrow",
}
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens",
    "Cuba": "Havana", "Chile": "Santiago", "Ireland": "Dublin", "Poland": "Warsaw",
    "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm", "Germany": "Berlin",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

ANTONYM_PROMPTS = ["What is the opposite of {w}?", "Give the antonym of {w}.", "Opposite of {w}?"]
ADD_PROMPTS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]
CAPITAL_PROMPTS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Capital of {c}?"]


def demo_examples(seed: int = 0) -> list[dict[str, str]]:
    """Every (skill, fact, phrasing) combination, in a seeded shuffled order (alpaca format)."""
    rows: list[dict[str, str]] = []
    for word, opposite in ANTONYMS.items():
        for prompt in ANTONYM_PROMPTS:
            rows.append({"instruction": prompt.format(w=word), "output": f"The opposite of {word} is {opposite}."})
    for a in range(10):
        for b in range(10):
            if a + b > 9:
                continue
            for prompt in ADD_PROMPTS:
                rows.append(
                    {"instruction": prompt.format(a=a, b=b), "output": f"{a} plus {b} is {a + b}, {NUMBERS[a + b]}."}
                )
    for country, capital in CAPITALS.items():
        for prompt in CAPITAL_PROMPTS:
            rows.append({"instruction": prompt.format(c=country), "output": f"The capital of {country} is {capital}."})
    random.Random(seed).shuffle(rows)
    return rows


def demo_corpus() -> list[str]:
    """Plain text used to train the built-in tokenizer (and as `pt` demo data)."""
    texts = []
    for row in demo_examples():
        texts.append(f"{row['instruction']} {row['output']}")
    texts.append(" ".join(NUMBERS))
    return texts


def write_demo_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alpaca = directory / "demo_alpaca.json"
    alpaca.write_text(json.dumps(demo_examples(), indent=1) + "\n")
    text = directory / "demo_text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_corpus()))
    return [alpaca, text]


if __name__ == "__main__":
    for written in write_demo_files(sys.argv[1] if len(sys.argv) > 1 else "examples/data"):
        print(written)
