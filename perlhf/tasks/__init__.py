"""Built-in tasks: prompts, a gold judge the policy never trains on, and a preference-data maker.

A task is what the quickstarts run and what evaluation measures against. Its judge plays the
human: it labels preference pairs (through Bradley–Terry noise, as raters are noisy) and scores
policies after training, so RL is measured against the "human", not against the reward model it
optimised. Judges share one signature, ``judge(prompts, responses, **row) -> list[float]``, the
same as a reward function's, so a judge can also serve as a verifiable reward.

- ``topic-words`` (``perlhf.data.synthetic``): tiny GPT-2 built in process; a rule-based scorer
  written here.
- ``shapes`` (``perlhf.data.shapes``): tiny LLaVA; the answer read off the image's pixels.
- ``sentiment`` (``perlhf.tasks.sentiment``): the real SmolLM2-135M-Instruct; judged by
  VADER, a published sentiment analyser the project did not write.
"""

from __future__ import annotations

from perlhf.tasks.base import Judge, Task, bradley_terry_label, get_task, win_rate

__all__ = ["Judge", "Task", "bradley_terry_label", "get_task", "win_rate"]
