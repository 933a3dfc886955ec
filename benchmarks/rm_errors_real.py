"""Where a real-model reward model errs, and how much a word-count model learns from the same pairs.

    python benchmarks/rm_errors_real.py --root checkpoints/real            # after quickstart_real
    python benchmarks/rm_errors_real.py --root DIR --reward-model DIR/reward-model/adapter

Two diagnostics of the sentiment task's reward model (``docs/real-report.md``):

1. **Accuracy by judge gap.** The held-out pairs (``data/preference/val.jsonl``), bucketed by
   ``|VADER(chosen) − VADER(rejected)|``, with the reward model's accuracy in each bucket.
2. **A word-count baseline.** L2-regularised logistic regression on the difference of the two
   answers' word counts, fitted on the training pairs, scored on the held-out pairs. It is the
   accuracy of learning word weights from the pairs alone, with no pretrained knowledge.

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GAP_EDGES = (0.05, 0.1, 0.2, 0.4, 0.8, float("inf"))
"""Bucket edges of the judge's score gap; the task drops pairs closer than 0.05 as ties."""
L2_STRENGTHS = (1e-3, 1e-2, 3e-2, 1e-1)


def accuracy_by_gap(
    gaps: Sequence[float], correct: Sequence[bool], edges: Sequence[float] = GAP_EDGES
) -> list[dict[str, Any]]:
    """``[{"low", "high", "pairs", "accuracy"}]`` per bucket ``low <= gap < high`` (gaps below the
    first edge are left out; an empty bucket's accuracy is ``None``)."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        hits = [c for g, c in zip(gaps, correct, strict=True) if low <= g < high]
        rows.append(
            {
                "low": low,
                "high": high,
                "pairs": len(hits),
                "accuracy": sum(hits) / len(hits) if hits else None,
            }
        )
    return rows


def words(text: str) -> list[str]:
    """Lower-cased words (apostrophes kept) and ``!``/``?``, the units VADER weighs."""
    return re.findall(r"[a-z']+|[!?]", text.lower())


def count_differences(pairs: Sequence[tuple[str, str]], vocab: dict[str, int]) -> torch.Tensor:
    """``(N, V)`` word counts of each pair's first text minus its second (words outside ``vocab``
    ignored)."""
    x = torch.zeros(len(pairs), len(vocab))
    for i, (first, second) in enumerate(pairs):
        for text, sign in ((first, 1.0), (second, -1.0)):
            for w in words(text):
                if w in vocab:
                    x[i, vocab[w]] += sign
    return x


def word_count_baseline(
    train: Sequence[tuple[str, str]], heldout: Sequence[tuple[str, str]], l2: float
) -> dict[str, float]:
    """Fit ``P(first preferred) = sigmoid(w · (counts(first) − counts(second)))`` on ``train``
    (every first text preferred) with L-BFGS; train and held-out accuracy."""
    vocab: dict[str, int] = {}
    for pair in train:
        for text in pair:
            for w in words(text):
                vocab.setdefault(w, len(vocab))
    x_train, x_heldout = count_differences(train, vocab), count_differences(heldout, vocab)
    weights = torch.zeros(len(vocab), requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(x_train @ weights)).mean() + l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return {
            "l2": l2,
            "train_accuracy": float((x_train @ weights > 0).float().mean()),
            "heldout_accuracy": float((x_heldout @ weights > 0).float().mean()),
        }


def _pairs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _texts(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows]


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Reward-model errors on the real task",
        "",
        f"Reward model `{result['reward_model']}`: held-out accuracy **{result['accuracy']:.3f}** "
        f"on {result['heldout_pairs']} pairs.",
        "",
        "| judge gap | pairs | accuracy |",
        "|---|---|---|",
    ]
    for b in result["by_gap"]:
        high = "" if b["high"] == float("inf") else f"{b['high']:g}"
        acc = "—" if b["accuracy"] is None else f"{b['accuracy']:.3f}"
        lines.append(f"| {b['low']:g}–{high} | {b['pairs']} | {acc} |")
    lines += [
        "",
        f"Word-count baseline (logistic regression on word-count differences, {result['train_pairs']} "
        "training pairs):",
        "",
        "| L2 | train accuracy | held-out accuracy |",
        "|---|---|---|",
    ]
    lines += [
        f"| {b['l2']:g} | {b['train_accuracy']:.3f} | {b['heldout_accuracy']:.3f} |"
        for b in result["baseline"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="checkpoints/real")
    parser.add_argument("--reward-model", help="default: <root>/reward-model/adapter")
    parser.add_argument("--out", default="benchmarks/results/cpu/parity-real/rm-errors")
    args = parser.parse_args(argv)
    from perlhf.data.rollout_utils import load_reward_model, reward_scores

    root = Path(args.root)
    reward_model = args.reward_model or str(root / "reward-model" / "adapter")
    train = _pairs(root / "data" / "preference" / "train.jsonl")
    heldout = _pairs(root / "data" / "preference" / "val.jsonl")
    model, tokenizer = load_reward_model(reward_model)

    def scores(key: str) -> torch.Tensor:
        texts = [tokenizer.apply_chat_template(r["prompt"] + r[key], tokenize=False) for r in heldout]
        return reward_scores(model, tokenizer, texts)

    correct = (scores("chosen") > scores("rejected")).tolist()
    gaps = [abs(r["score_chosen"] - r["score_rejected"]) for r in heldout]
    result = {
        "reward_model": reward_model,
        "heldout_pairs": len(heldout),
        "train_pairs": len(train),
        "accuracy": sum(correct) / len(correct),
        "by_gap": accuracy_by_gap(gaps, correct),
        "baseline": [word_count_baseline(_texts(train), _texts(heldout), l2) for l2 in L2_STRENGTHS],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
