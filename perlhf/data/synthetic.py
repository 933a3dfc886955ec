"""The built-in "topic words" task: a hidden gold scorer that plays the human labeller.

A prompt asks for words on a topic in one of several phrasings (``"Name some colours:"``,
``"Which animals do you know?"``); a response is a short list of words. The gold score rewards
distinct on-topic words and penalises off-topic and repeated ones, so it depends on both prompt
and response — a reward model must read the prompt to learn it. Preference labels come from the
gold score through Bradley–Terry noise, as human labels do; SFT demonstrations are good but
imperfect, as human demonstrations are. One phrasing per topic is held out of all training.
The pretraining text's lists never repeat a word, so a base model learns to condition on what it
already wrote; the preference data does contain repeats and loops, as generations do.

The task is small enough that a model of a few hundred thousand parameters learns it on a CPU in
a minute, which makes it the offline quickstart and the test bed for every module.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

TOPICS: dict[str, tuple[str, ...]] = {
    "colours": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"),
    "animals": ("cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "eagle"),
    "fruits": ("apple", "pear", "plum", "mango", "lemon", "grape", "peach", "melon"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "spade", "rake", "axe"),
}
VOCABULARY: tuple[str, ...] = tuple(w for words in TOPICS.values() for w in words)
TEMPLATES: tuple[str, ...] = (
    "Name some {topic}:",
    "List a few {topic}:",
    "Which {topic} do you know?",
    "Give me some {topic}:",
)
PROMPT_TEMPLATE = TEMPLATES[0]
MAX_WORDS = 8
Split = Literal["train", "heldout", "all"]


def make_prompt(topic: str, template: int = 0) -> str:
    return TEMPLATES[template].format(topic=topic)


def prompt_pool(split: Split = "train") -> list[str]:
    """Every (topic, phrasing) prompt of ``split``.

    Each topic has one phrasing held out (topic ``i`` loses template ``i mod 4``): the 12
    ``train`` prompts feed SFT, reward modelling and RL; the 4 ``heldout`` prompts measure
    whether the policy generalises to phrasings it never trained on.
    """
    pool = []
    for i, topic in enumerate(TOPICS):
        for t in range(len(TEMPLATES)):
            heldout = t == i % len(TEMPLATES)
            if split == "all" or (split == "heldout") == heldout:
                pool.append(make_prompt(topic, t))
    return pool


def topic_of(prompt: str) -> str:
    """The topic a prompt asks about; raises ``ValueError`` for prompts outside the task."""
    for topic in TOPICS:
        if any(template.format(topic=topic) in prompt for template in TEMPLATES):
            return topic
    raise ValueError(f"not a topic-words prompt: {prompt!r}")


def gold_score(prompt: str, response: str) -> float:
    """Hidden gold reward: +1 per distinct on-topic word, -1 per off-topic word, -0.5 per repeat.

    Words past ``MAX_WORDS`` are ignored, so rambling earns nothing.
    """
    on_topic = set(TOPICS[topic_of(prompt)])
    seen: set[str] = set()
    score = 0.0
    for word in response.replace(",", " ").split()[:MAX_WORDS]:
        word = word.strip(".").lower()
        if word in seen:
            score -= 0.5
        elif word in on_topic:
            score += 1.0
        else:
            score -= 1.0
        seen.add(word)
    return score


def junk_word(rng: random.Random) -> str:
    """Gibberish, as degenerate generations produce: 1–6 random characters (ASCII symbols and
    letters, control characters, accented letters)."""
    pools = ((33, 126), (33, 126), (14, 27), (0xC0, 0x24F))  # no whitespace: 28–31 split words
    return "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(rng.randint(1, 6)))


def random_response(rng: random.Random, topic: str, junk: float = 0.1, loop: float = 0.1) -> str:
    """A response of 1–8 words mixing on-topic, off-topic and repeated words. Degenerate
    generations, which raters rank low, come in two kinds: with probability ``junk``, 1–6 words
    of gibberish; with probability ``loop``, one or two words said over and over (2–8 words)."""
    if rng.random() < junk:
        return " " + " ".join(junk_word(rng) for _ in range(rng.randint(1, 6)))
    if rng.random() < loop:
        size = rng.randint(1, 2)
        cycle = [rng.choice(TOPICS[topic] if rng.random() < 0.7 else VOCABULARY) for _ in range(size)]
        return " " + " ".join(cycle[i % len(cycle)] for i in range(rng.randint(2, MAX_WORDS)))
    n = rng.randint(1, 8)
    p_on = rng.random()
    words: list[str] = []
    for _ in range(n):
        if words and rng.random() < 0.15:
            words.append(rng.choice(words))
        elif rng.random() < p_on:
            words.append(rng.choice(TOPICS[topic]))
        else:
            words.append(rng.choice(VOCABULARY))
    return " " + " ".join(words)


def demonstration(rng: random.Random, topic: str, lengths: tuple[int, int] = (2, 5)) -> str:
    """A good but imperfect human demonstration: ``lengths`` (inclusive) distinct words, each
    off-topic with probability 0.15 (a careless writer), never repeated."""
    n = rng.randint(*lengths)
    words: list[str] = []
    while len(words) < n:
        pool = TOPICS[topic] if rng.random() >= 0.15 else VOCABULARY
        word = rng.choice(pool)
        if word not in words:
            words.append(word)
    return " " + " ".join(words)


def demonstrations(n: int, seed: int = 0, split: Split = "train") -> Iterator[dict]:
    """Yield ``n`` SFT rows ``{"prompt", "completion"}`` of demonstrations on ``split`` prompts."""
    rng = random.Random(seed)
    pool = prompt_pool(split)
    for _ in range(n):
        prompt = rng.choice(pool)
        yield {"prompt": prompt, "completion": demonstration(rng, topic_of(prompt))}


def preference_pairs(
    n: int, seed: int = 0, beta: float = 2.0, noisy: bool = True, split: Split = "train"
) -> Iterator[dict]:
    """Yield ``n`` rows ``{"prompt", "chosen", "rejected", "gold_margin"}``.

    Each response is, with equal odds, a random one (``random_response``) or an SFT-policy-like
    one (a demonstration of 1–8 words), as preference data is collected from a mix of policies.

    With ``noisy``, the chosen response wins with probability ``σ(beta · Δgold)`` (Bradley–Terry
    labeller); without, the higher gold score always wins. Ties are resampled.
    """
    rng = random.Random(seed)
    pool = prompt_pool(split)
    made = 0
    while made < n:
        prompt = rng.choice(pool)
        topic = topic_of(prompt)
        a, b = (
            random_response(rng, topic) if rng.random() < 0.5 else demonstration(rng, topic, (1, 8))
            for _ in range(2)
        )
        delta = gold_score(prompt, a) - gold_score(prompt, b)
        if delta == 0:
            continue
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-beta * delta)) if noisy else delta > 0
        chosen, rejected = (a, b) if a_wins else (b, a)
        made += 1
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold_margin": abs(delta)}


def ceiling(prompt: str, token_budget: int, count_tokens: Callable[[str], int]) -> float:
    """The best gold score any response of at most ``token_budget`` tokens can get.

    Only distinct on-topic words score (+1 each, at most ``MAX_WORDS``), so the best response
    lists as many of them as fit, shortest first. ``count_tokens(" word")`` is the policy
    tokenizer's length of one word with its leading space.
    """
    costs = sorted(count_tokens(" " + word) for word in TOPICS[topic_of(prompt)])
    score, used = 0, 0
    for cost in costs[:MAX_WORDS]:
        if used + cost > token_budget:
            break
        score, used = score + 1, used + cost
    return float(score)


def prompts(n: int, seed: int = 0, split: Split = "train") -> Iterator[dict]:
    """Yield ``n`` prompt rows ``{"prompt"}`` of ``split`` for RL."""
    rng = random.Random(seed)
    pool = prompt_pool(split)
    for _ in range(n):
        yield {"prompt": rng.choice(pool)}


def word_list(rng: random.Random, topic: str, junk: float = 0.1) -> str:
    """A list as pretraining text has them: like ``random_response`` (1–8 words, a random share on
    topic, or gibberish with probability ``junk``) but never repeating a word, as lists in real
    text rarely do."""
    if rng.random() < junk:
        return " " + " ".join(junk_word(rng) for _ in range(rng.randint(1, 6)))
    n = rng.randint(1, MAX_WORDS)
    p_on = rng.random()
    words: list[str] = []
    while len(words) < n:
        word = rng.choice(TOPICS[topic]) if rng.random() < p_on else rng.choice(VOCABULARY)
        if word not in words:
            words.append(word)
    return " " + " ".join(words)


COMPLETE_LIST_PROMPT = "All the {topic}:"
"""Pretraining text's heading of a complete list (not a task phrasing: the task never asks it)."""


def corpus(n: int = 2000, seed: int = 0, complete: float = 0.25) -> Iterator[str]:
    """The "pretraining" text for the tiny tokenizer and base model.

    A share ``complete`` of the texts is a complete list, ``"All the colours:"`` and every word
    of the topic once in random order, where each next word is one not yet said; the rest are the
    task's phrasings followed by a ``word_list``. A tiny model learns to condition on what it
    already wrote from complete lists; from mixed lists alone it does not, within thousands of
    steps.
    """
    rng = random.Random(seed)
    pool = prompt_pool("all")
    for _ in range(n):
        if rng.random() < complete:
            topic = rng.choice(list(TOPICS))
            words = list(TOPICS[topic])
            rng.shuffle(words)
            yield COMPLETE_LIST_PROMPT.format(topic=topic) + " " + " ".join(words)
        else:
            prompt = rng.choice(pool)
            yield prompt + word_list(rng, topic_of(prompt))


def repeats_a_word(response: str) -> bool:
    """Whether a response says one of its first ``MAX_WORDS`` words twice (what the gold score
    penalises as a repeat)."""
    words = [w.strip(".").lower() for w in response.replace(",", " ").split()[:MAX_WORDS]]
    return len(words) != len(set(words))


def write_jsonl(rows: Iterator[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_preference_data(out_dir: str | Path, n_train: int = 4000, n_val: int = 400, seed: int = 0) -> Path:
    """Write ``train.jsonl`` (noisy labels) and ``val.jsonl`` (gold labels) under ``out_dir``."""
    out_dir = Path(out_dir)
    write_jsonl(preference_pairs(n_train, seed=seed), out_dir / "train.jsonl")
    write_jsonl(preference_pairs(n_val, seed=seed + 1, noisy=False), out_dir / "val.jsonl")
    return out_dir


def gold_reward(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """``gold_score`` as a reward function (``perlhf.rewards``): RL directly on the gold judge."""
    return [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]
