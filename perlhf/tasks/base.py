"""The task protocol and the pieces every task shares: noisy preference labels and win rates."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "heldout"]
Prompt = str | list[dict[str, str]]
"""Plain text, or chat messages (``[{"role": "user", "content": ...}]``) for a chat model."""


@runtime_checkable
class Judge(Protocol):
    """Scores responses as the "human" would: higher is better."""

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str], **row: Any) -> list[float]: ...


class Task(Protocol):
    """A built-in benchmark: prompts split so that evaluation uses prompts no stage trained on,
    and the gold judge."""

    name: str

    def prompts(self, split: Split) -> list[Prompt]:
        """Every prompt of ``split``."""
        ...

    def judge(self, prompts: Sequence[Prompt], responses: Sequence[str], **row: Any) -> list[float]:
        """Gold scores, one per response."""
        ...


def bradley_terry_label(score_a: float, score_b: float, temperature: float, rng: random.Random) -> bool:
    """Whether a noisy rater prefers ``a``: with probability ``σ((score_a − score_b) / temperature)``
    (``temperature`` 0: always the higher score, ties to ``a``)."""
    if temperature <= 0:
        return score_a >= score_b
    z = (score_a - score_b) / temperature
    return rng.random() < 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def win_rate(scores: Sequence[float], baseline: Sequence[float], tie: float = 1e-9) -> float:
    """Share of paired comparisons ``scores[i]`` vs ``baseline[i]`` won, ties counting half (the
    paper's metric: the trained policy against the starting one on the same prompts)."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(
            f"win_rate needs two equally long, non-empty lists, got {len(scores)} and {len(baseline)}"
        )
    pairs = zip(scores, baseline, strict=True)
    wins = sum(1.0 if a > b + tie else 0.5 if abs(a - b) <= tie else 0.0 for a, b in pairs)
    return wins / len(scores)


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (``topic-words``, ``sentiment``)."""
    if name == "sentiment":
        from perlhf.tasks.sentiment import SentimentTask

        return SentimentTask()
    if name == "topic-words":
        from perlhf.tasks.topic_words import TopicWordsTask

        return TopicWordsTask()
    raise ValueError(f"unknown task {name!r}; built-in tasks: 'topic-words', 'sentiment'")
