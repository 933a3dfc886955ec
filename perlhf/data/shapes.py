"""The built-in image task, "shapes": one coloured shape on a small canvas, and questions about it.

A scene is one ``circle``, ``square`` or ``triangle`` in ``red``, ``green``, ``blue`` or
``yellow`` on a white canvas, drawn with PIL at a random place and size. Questions ask for the
colour, the shape, or whether a given coloured shape is there (yes/no). The gold scorer plays the
human: it reads the answer off the *pixels* (the colour of the drawn pixels, the shape from how
much of its bounding box it fills), so it needs nothing but the image and the question.

The task gives preference pairs (the right answer over a wrong one), good/bad classifier
examples (the VQA reward model's form) and image prompts for RL; it is the offline VLM
quickstart and the test bed of the VLM code path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CANVAS = 32
BACKGROUND = (255, 255, 255)
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}
YES_NO = "Is there a {colour} {shape}?"
CAPTION = "Describe the image."


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A ``CANVAS``-pixel RGB image of one ``colour`` ``shape`` at a random place and size."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    size = rng.randint(CANVAS * 5 // 8, CANVAS - 3)
    x, y = rng.randint(1, CANVAS - size - 2), rng.randint(1, CANVAS - size - 2)
    box = [x, y, x + size, y + size]
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=fill)
    return image


def read_scene(image: Image.Image) -> tuple[str, str]:
    """``(colour, shape)`` of the drawn shape, from the pixels: the nearest palette colour of the
    non-background pixels, and the shape from the share of its bounding box they fill (square ~1,
    circle ~π/4, triangle ~1/2)."""
    pixels = image.convert("RGB").load()
    width, height = image.size
    points = [(x, y) for x in range(width) for y in range(height) if pixels[x, y] != BACKGROUND]
    if not points:
        raise ValueError("no shape in the image")
    mean = [sum(pixels[p][c] for p in points) / len(points) for c in range(3)]
    colour = min(
        COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], mean, strict=True))
    )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    fill = len(points) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    return colour, shape


def question_of(prompt: str) -> tuple[str, str | None]:
    """``(kind, asked)`` of the question inside ``prompt`` (raw or chat-rendered): kind is
    ``colour``, ``shape`` or ``yesno``; ``asked`` is ``"<colour> <shape>"`` for yes/no questions."""
    for kind, question in QUESTIONS.items():
        if question in prompt:
            return kind, None
    for colour in COLOURS:
        for shape in SHAPES:
            if YES_NO.format(colour=colour, shape=shape) in prompt:
                return "yesno", f"{colour} {shape}"
    raise ValueError(f"not a shapes question: {prompt!r}")


def options(kind: str) -> tuple[str, ...]:
    """The answers a question of ``kind`` can have."""
    return {"colour": tuple(COLOURS), "shape": SHAPES, "yesno": ("yes", "no")}[kind]


def gold_answer(prompt: str, image: Image.Image) -> str:
    """The right answer to the question in ``prompt`` about ``image``."""
    kind, asked = question_of(prompt)
    colour, shape = read_scene(image)
    if kind == "colour":
        return colour
    if kind == "shape":
        return shape
    return "yes" if asked == f"{colour} {shape}" else "no"


def first_word(response: str) -> str:
    words = response.strip().lower().split()
    return words[0].strip(".,!?") if words else ""


def gold_score(prompt: str, response: str, images: list[Image.Image]) -> float:
    """1 if the response's first word is the right answer, else 0 (the gold accuracy)."""
    return float(first_word(response) == gold_answer(prompt, images[0]))


KINDS: tuple[str, ...] = ("colour", "shape", "yesno")


def _question(rng: random.Random, colour: str, shape: str, kinds: tuple[str, ...] = KINDS) -> str:
    kind = rng.choice(kinds)
    if kind != "yesno":
        return QUESTIONS[kind]
    if rng.random() < 0.5:  # half the yes/no questions ask about what is there
        return YES_NO.format(colour=colour, shape=shape)
    while True:
        asked = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        if asked != (colour, shape):
            return YES_NO.format(colour=asked[0], shape=asked[1])


def examples(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Iterator[tuple[Image.Image, str, str]]:
    """``n`` random ``(image, question, gold answer)`` triples, questions of ``kinds``."""
    rng = random.Random(seed)
    for _ in range(n):
        colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        image = draw(colour, shape, rng)
        question = _question(rng, colour, shape, kinds)
        yield image, question, gold_answer(question, image)


def _wrong(rng: random.Random, question: str, answer: str) -> str:
    return rng.choice([o for o in options(question_of(question)[0]) if o != answer])


def preference_pairs(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Iterator[dict]:
    """Rows ``{"images", "prompt", "chosen", "rejected"}``: the right answer over a wrong one."""
    rng = random.Random(seed + 7)
    for image, question, answer in examples(n, seed, kinds):
        yield {
            "images": [image],
            "prompt": question,
            "chosen": answer,
            "rejected": _wrong(rng, question, answer),
        }


def classifier_rows(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Iterator[dict]:
    """Rows ``{"images", "prompt", "response", "label"}``: half right (1), half wrong (0) answers."""
    rng = random.Random(seed + 7)
    for image, question, answer in examples(n, seed, kinds):
        good = rng.random() < 0.5
        response = answer if good else _wrong(rng, question, answer)
        yield {"images": [image], "prompt": question, "response": response, "label": int(good)}


def prompts(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Iterator[dict]:
    """Rows ``{"images", "prompt"}`` for RL."""
    for image, question, _ in examples(n, seed, kinds):
        yield {"images": [image], "prompt": question}


def corpus(n: int, seed: int = 0, p_right: float = 0.4) -> Iterator[tuple[Image.Image, str, str]]:
    """Pretraining ``(image, user text, reply)``: captions (``"red circle"``), which teach the
    backbone to see colours and shapes, and questions answered right with probability
    ``p_right`` and at random otherwise: the base model knows the answer format and leans towards
    the right answer, as a pretrained VLM does, but is far from reliable (the reward model and RL
    are there to fix that)."""
    rng = random.Random(seed + 13)
    for image, question, answer in examples(n, seed):
        if rng.random() < 0.5:
            yield image, CAPTION, " ".join(read_scene(image))
        elif rng.random() < p_right:
            yield image, question, answer
        else:
            yield image, question, rng.choice(options(question_of(question)[0]))


def write_parquet(rows: Iterator[dict], path: str | Path) -> Path:
    """Write rows to a parquet file; the images go in as a ``datasets`` Image column (bytes)."""
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(list(rows)).to_parquet(str(path))
    return path
