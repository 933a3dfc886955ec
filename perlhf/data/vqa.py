"""VQAv2 as good/bad answers for a classifier reward model (the paper's VQA task), and prompts for RL.

Each VQAv2 question has ten human answers, each with the answerer's confidence (``yes``,
``maybe``, ``no``), and a consensus ``multiple_choice_answer``. ``classifier_rows`` turns a
question into labelled answers:

- good (1): the consensus answer, when some annotator gave it with confidence ``yes``;
- bad (0): answers that disagree with the consensus and were given by at most one annotator, or
  only with confidence ``no``; and the consensus answer of another question of the same answer
  type (``yes/no``, ``number``, ``other``) when it differs, so every question has a bad answer;
- answers given with confidence ``maybe`` only, or by several annotators against the consensus,
  are ambiguous and left out.

    python -m perlhf.data.vqa data/vqav2 --max-questions 20000   # writes train/test parquet + prompts

The output has columns ``image`` (a ``datasets`` Image column), ``prompt`` (the question),
``response`` and ``label`` — what ``PreferenceDataModule(format="classifier")`` reads — and
``prompts.parquet`` (``image``, ``prompt``) for ``RolloutDataModule``.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path
from typing import Any

SOURCE = "lmms-lab/VQAv2"
"""A parquet copy of VQAv2 on the Hub (its ``validation`` split has the human answers)."""


def classifier_rows(row: dict[str, Any], other: str | None, prefix: str = " ") -> list[dict[str, Any]]:
    """Labelled ``{"prompt", "response", "label"}`` answers of one VQAv2 row (see the module
    docstring); ``other`` is a consensus answer of another question of the same answer type;
    ``prefix`` goes before each answer (a chat template's generation prompt often ends without
    the space a model puts before its reply)."""
    consensus = row["multiple_choice_answer"].strip().lower()
    answers = [(a["answer"].strip().lower(), a["answer_confidence"]) for a in row["answers"]]
    counts = Counter(text for text, _ in answers)
    confident = {text for text, confidence in answers if confidence == "yes"}
    doubted = {text for text, confidence in answers if confidence != "no"}
    labelled: dict[str, int] = {}
    if consensus in confident:
        labelled[consensus] = 1
    for text in counts:
        if text != consensus and text and (counts[text] <= 1 or text not in doubted):
            labelled[text] = 0
    if other is not None and other.strip().lower() not in counts:
        labelled[other.strip().lower()] = 0
    return [
        {"prompt": row["question"], "response": prefix + text, "label": label}
        for text, label in labelled.items()
    ]


def convert(
    out_dir: str | Path,
    source: str = SOURCE,
    split: str = "validation",
    max_questions: int | None = None,
    test_fraction: float = 0.05,
    seed: int = 0,
    prefix: str = " ",
) -> Path:
    """Write ``train.parquet`` / ``test.parquet`` (classifier rows, split by image so no test
    image is trained on) and ``prompts.parquet`` (the training questions) under ``out_dir``."""
    from datasets import load_dataset

    data = load_dataset(source, split=split)
    if max_questions is not None:
        data = data.shuffle(seed=seed).select(range(min(max_questions, len(data))))
    rng = random.Random(seed)
    by_type: dict[str, list[str]] = {}
    for answer_type, answer in zip(data["answer_type"], data["multiple_choice_answer"], strict=True):
        by_type.setdefault(answer_type, []).append(answer)
    images = sorted(set(data["image_id"]))
    rng.shuffle(images)
    test_images = set(images[: max(1, round(len(images) * test_fraction))])

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "prompt": [], "response": [], "label": []}
        for i in range(len(batch["question"])):
            row = {key: values[i] for key, values in batch.items()}
            other = rng.choice(by_type[row["answer_type"]])
            for labelled in classifier_rows(row, other, prefix):
                out["image"].append(row["image"])
                for key in ("prompt", "response", "label"):
                    out[key].append(labelled[key])
        return out

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", False), ("test", True)):
        part = data.filter(
            lambda image_id, keep=keep: (image_id in test_images) == keep, input_columns="image_id"
        )
        if name == "train":
            part.select_columns(["image", "question"]).rename_column("question", "prompt").to_parquet(
                str(out_dir / "prompts.parquet")
            )
        part.map(expand, batched=True, remove_columns=part.column_names).to_parquet(
            str(out_dir / f"{name}.parquet")
        )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="VQAv2 -> classifier reward-model data + RL prompts")
    parser.add_argument("out_dir")
    parser.add_argument("--source", default=SOURCE)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.out_dir, args.source, args.split, args.max_questions, seed=args.seed)}")


if __name__ == "__main__":
    main()
