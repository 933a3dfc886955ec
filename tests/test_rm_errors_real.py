"""The reward-model error diagnostics of the real task: gap buckets and the word-count baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rm_errors_real.py"


@pytest.fixture(scope="module")
def diag():
    return load_script(SCRIPT, "perlhf_rm_errors_real")


def test_accuracy_by_gap_buckets_by_hand(diag) -> None:
    gaps = [0.01, 0.05, 0.09, 0.1, 0.5, 2.0, 0.3]
    correct = [True, True, False, True, False, True, True]
    rows = diag.accuracy_by_gap(gaps, correct, edges=(0.05, 0.1, 0.4, float("inf")))
    # 0.01 is below the first edge (a tie): left out. [0.05, 0.1): 0.05 ok, 0.09 wrong.
    assert [(r["low"], r["pairs"], r["accuracy"]) for r in rows] == [
        (0.05, 2, 0.5),
        (0.1, 2, 1.0),  # 0.1 and 0.3
        (0.4, 2, 0.5),  # 0.5 wrong, 2.0 right
    ]
    assert diag.accuracy_by_gap([0.01], [True], edges=(0.05, 1.0))[0]["accuracy"] is None


def test_count_differences_by_hand(diag) -> None:
    vocab = {"good": 0, "bad": 1, "!": 2}
    x = diag.count_differences([("Good, good! Not bad.", "bad bad"), ("unknown", "GOOD")], vocab)
    assert torch.equal(x, torch.tensor([[2.0, 1.0 - 2.0, 1.0], [-1.0, 0.0, 0.0]]))


def test_word_count_baseline_learns_word_weights_and_nothing_else(diag) -> None:
    train = [
        (f"a {g} day {i}", f"a {b} day {i}")
        for i in range(20)
        for g, b in (("good", "bad"), ("great", "awful"))
    ]
    heldout = [("good stuff", "bad stuff"), ("awful film", "great film")]
    fit = diag.word_count_baseline(train, heldout, l2=1e-3)
    assert fit["train_accuracy"] == 1.0
    assert fit["heldout_accuracy"] == 0.5  # the second held-out pair is labelled the wrong way round
    swapped = diag.word_count_baseline([(b, a) for a, b in train], heldout[:1], l2=1e-3)
    assert swapped["heldout_accuracy"] == 0.0
