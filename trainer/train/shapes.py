"""The multimodal demo task: coloured shapes on small pictures, and questions about them.

A tiny vision-language model can only answer "what colour is the shape?" by looking: the question
is the same for every picture, so the answer's words are in the image, not in the text. The base
model (random weights) answers nothing right; after `examples/multimodal.yaml` the held-out
exact match is far above the 1-in-6 of guessing a colour. Pictures are 32x32 PNGs (the size of the
`builtin:tiny-llava` vision encoder's input), drawn deterministically from a seed.

`python -m kubetune.trainer.train.shapes DIR` writes what `examples/data/shapes/` holds: the
pictures, the training rows in the sharegpt/LlamaFactory form (`messages` with `<image>`, and an
`images` list) and the held-out rows in LMFlow's image-text (LLaVA) form (`image`, `conversations`).

The same pictures and questions also make a preference task for `stage: dpo` (`preferences.json`,
`preferences_eval.json`): `chosen` is the right answer about the picture, `rejected` the same
sentence with another colour or shape. Both answers are equally likely without the picture (every
colour and shape is as often wrong as right), so only a model that looks can prefer the chosen one.
The pairs are in LlamaFactory's multimodal preference form: `conversations` (sharegpt turns, with
`<image>`) or `messages` (role/content) for the prompt, `chosen` and `rejected`, and `images`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTIONS = ("What colour is the shape?", "Which colour is it?", "Name the colour of the shape.")
SHAPE_QUESTIONS = ("What shape is this?", "Which shape do you see?", "Name the shape.")
SIZE = 32
TRAIN_ROWS = 480
EVAL_ROWS = 60


def draw(shape: str, colour: str, rng: random.Random):
    """One picture: the shape in the colour (a little jittered) at a random place and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    side = rng.randint(12, 22)
    x, y = rng.randint(1, SIZE - side - 1), rng.randint(1, SIZE - side - 1)
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def answer(kind: str, shape: str, colour: str) -> str:
    return f"It is {colour}." if kind == "colour" else f"It is a {shape}."


def examples(count: int, seed: int) -> list[dict]:
    """`count` (picture, question, answer) rows: shape, colour and question drawn at random."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        kind = rng.choice(("colour", "shape"))
        question = rng.choice(COLOUR_QUESTIONS if kind == "colour" else SHAPE_QUESTIONS)
        rows.append({"shape": shape, "colour": colour, "kind": kind, "question": question,
                     "answer": answer(kind, shape, colour), "image": draw(shape, colour, rng)})
    return rows


def wrong_answer(kind: str, shape: str, colour: str, rng: random.Random) -> str:
    """The answer with another colour (or shape) than the picture's, drawn from `rng`."""
    if kind == "colour":
        return answer(kind, shape, rng.choice([c for c in sorted(COLOURS) if c != colour]))
    return answer(kind, rng.choice([s for s in SHAPES if s != shape]), colour)


def preference_pair(row: dict, image: str, rng: random.Random, *, sharegpt: bool) -> dict:
    """One picture's question with its right (`chosen`) and a wrong (`rejected`) answer, in
    LlamaFactory's multimodal preference form (sharegpt turns, or role/content messages)."""
    question = f"<image>\n{row['question']}"
    wrong = wrong_answer(row["kind"], row["shape"], row["colour"], rng)
    if sharegpt:
        return {"conversations": [{"from": "human", "value": question}], "chosen": {"from": "gpt", "value": row["answer"]},
                "rejected": {"from": "gpt", "value": wrong}, "images": [image]}
    return {"messages": [{"role": "user", "content": question}], "chosen": row["answer"], "rejected": wrong, "images": [image]}


def shapes_corpus() -> list[str]:
    """The demo's words, for the built-in tokenizer (so colours and shapes are whole tokens)."""
    texts = [*COLOUR_QUESTIONS, *SHAPE_QUESTIONS]
    texts += [answer("colour", "", colour) for colour in COLOURS] + [answer("shape", shape, "") for shape in SHAPES]
    return texts * 20


def write_shapes(directory: str | Path) -> list[Path]:
    """The pictures under `images/`, `train.json` (sharegpt form) and `eval.json` (LLaVA form), and
    the same pictures' preference pairs, `preferences.json` and `preferences_eval.json`."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    train, held_out, pairs, held_out_pairs = [], [], [], []
    wrong = random.Random(2)
    for split, rows, seed in (("train", train, 0), ("eval", held_out, 1)):
        for index, row in enumerate(examples(TRAIN_ROWS if split == "train" else EVAL_ROWS, seed)):
            name = f"images/{split}-{index:04d}.png"
            row["image"].save(directory / name, optimize=True)
            (pairs if split == "train" else held_out_pairs).append(preference_pair(row, name, wrong, sharegpt=split == "train"))
            if split == "train":
                rows.append({"messages": [{"role": "user", "content": f"<image>\n{row['question']}"},
                                          {"role": "assistant", "content": row["answer"]}], "images": [name]})
            else:
                rows.append({"image": name, "conversations": [{"from": "human", "value": f"<image>\n{row['question']}"},
                                                              {"from": "gpt", "value": row["answer"]}]})
    written = []
    for name, rows in (("train", train), ("eval", held_out), ("preferences", pairs), ("preferences_eval", held_out_pairs)):
        written.append(directory / f"{name}.json")
        written[-1].write_text(json.dumps(rows, indent=1) + "\n")
    return written


if __name__ == "__main__":
    for path in write_shapes(sys.argv[1] if len(sys.argv) > 1 else "examples/data/shapes"):
        print(path)
