"""Rewards: anything that scores ``(prompt, response)`` pairs for RL.

One protocol, ``Reward``: ``reward(prompts, responses, rows) -> (N,)`` float32 scores, where
``rows[i]`` holds the other columns of prompt ``i``'s dataset row (a reference answer, a test
case…) and, for chat prompts, its ``messages``. Implementations:

- ``RewardModelScorer``: a frozen sequence classifier that re-tokenises the texts with its own
  tokenizer (chat prompts rendered with its chat template when it has one);
- ``FunctionReward``: a Python callable ``f(prompts, responses, **columns) -> list[float]``, given
  by import path in YAML (``RewardFunction``), e.g. a verifiable or rule-based reward, or a
  task's gold judge (``perlhf.data.synthetic.gold_reward``);
- ``weighted_sum``: the total of several, weighted, with each component kept for logging.

``RolloutDataModule`` owns the rewards; ``PPOModule`` never knows which kind produced a score.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.data.rollout_utils import reward_scores


class Reward(Protocol):
    """Scores ``(N,)`` float32 (CPU) of ``prompts[i] + responses[i]``; ``rows[i]``: the prompt's row."""

    def __call__(
        self, prompts: list[str], responses: list[str], rows: Sequence[dict[str, Any]]
    ) -> torch.Tensor: ...


@dataclass
class RewardFunction:
    """A reward function in YAML: ``{function: my_package.rewards.exact_match, weight: 1.0}``."""

    function: str
    """Import path of ``f(prompts, responses, **columns) -> list[float]``: ``package.module.name``
    or ``package.module:name``. ``columns`` are the prompt rows' other dataset columns, one list
    each (accept ``**kwargs`` to ignore them)."""
    weight: float = 1.0
    """Weight in the total reward."""
    name: str | None = None
    """Name it is logged under (``reward/<name>``); None: the function's name."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to every call."""


def import_callable(path: str) -> Callable:
    """The object at ``package.module.name`` or ``package.module:name``."""
    module_name, sep, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward function {path!r} is not an import path like 'package.module.name'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward function {path!r}: {err}") from err
    if not callable(function):
        raise ValueError(f"reward function {path!r} is a {type(function).__name__}, not a callable")
    return function


class FunctionReward:
    """A Python reward function as a ``Reward``; checks it returns one finite float per response."""

    def __init__(self, function: Callable | str, name: str | None = None, **kwargs: Any) -> None:
        self.function = import_callable(function) if isinstance(function, str) else function
        self.name = name or getattr(self.function, "__name__", "function")
        self.kwargs = kwargs

    def __call__(
        self, prompts: list[str], responses: list[str], rows: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "messages"]
        columns = {k: [row.get(k) for row in rows] for k in keys}
        scores = [float(s) for s in self.function(prompts, responses, **columns, **self.kwargs)]
        if len(scores) != len(responses):
            raise ValueError(
                f"reward function {self.name!r} returned {len(scores)} scores for {len(responses)} responses"
            )
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"reward function {self.name!r} returned a non-finite score")
        return torch.tensor(scores, dtype=torch.float32)


class RewardModelScorer:
    """A frozen sequence classifier as a ``Reward``: ``prompt + response`` re-tokenised with its
    tokenizer, or, for a row with chat ``messages`` and a tokenizer with a chat template, the
    conversation with the response as the assistant's turn; scored in chunks of ``batch_size``."""

    name = "reward_model"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(
        self, prompts: list[str], responses: list[str], rows: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        texts = []
        for prompt, response, row in zip(prompts, responses, rows, strict=True):
            chat = row.get("messages")
            if chat is not None and self.tokenizer.chat_template:
                conversation = [*chat, {"role": "assistant", "content": response}]
                texts.append(self.tokenizer.apply_chat_template(conversation, tokenize=False))
            else:
                texts.append(prompt + response)
        return reward_scores(self.model, self.tokenizer, texts, self.batch_size)


def weighted_sum(
    parts: dict[str, torch.Tensor], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ weights[name] · parts[name]`` ``(N,)``, and each part's mean under ``reward/<name>``."""
    total = sum(weights[name] * scores for name, scores in parts.items())
    return total, {f"reward/{name}": scores.mean().item() for name, scores in parts.items()}
