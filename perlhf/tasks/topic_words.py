"""The topic-words task (``perlhf.data.synthetic``) behind the ``Task`` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from perlhf.data import synthetic
from perlhf.tasks.base import Prompt, Split


class TopicWordsTask:
    """Name words on a topic; judged by the rule-based gold scorer of ``perlhf.data.synthetic``."""

    name = "topic-words"

    def prompts(self, split: Split) -> list[Prompt]:
        return list(synthetic.prompt_pool(split))

    def judge(self, prompts: Sequence[Prompt], responses: Sequence[str], **row: Any) -> list[float]:
        return [synthetic.gold_score(str(p), r) for p, r in zip(prompts, responses, strict=True)]
