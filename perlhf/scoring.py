"""The scalar of a sequence classifier, independent of padding.

``sequence_scores`` is the one place a reward model's score is read: in training
(``RewardModule``), in RL (``RolloutDataModule``'s reward-model scorer) and for inference
(``perlhf.RewardModel``). It pools the score at the last *attended* position and gives the
backbone padding-aware position ids, so a score depends on neither the padding side nor the pad
id. Hugging Face's own ``*ForSequenceClassification`` pools at the last token that differs from
``config.pad_token_id`` and, for absolute-position models such as GPT-2, lets left padding shift
the positions: the same text scored differently left-padded, or right-padded with an id other
than the config's.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn

from perlhf.vlm import VisionRewardModel, last_token_index


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``(N, L)`` that count attended tokens only, as ``generate`` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision: Any
) -> torch.Tensor:
    """Scalar scores ``(N,)`` float32 of sequences ``(N, L)``, padded on either side with any id.

    ``model`` is a decoder ``*ForSequenceClassification`` (LoRA-wrapped or not; its head is
    ``score``) or a ``VisionRewardModel``. Other classifiers (encoders with a ``classifier`` head)
    run their own forward.
    """
    if isinstance(model, VisionRewardModel):
        return model(input_ids=input_ids, attention_mask=attention_mask, **vision).logits[:, 0].float()
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    head = getattr(hf, "score", None)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    hidden = hf.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (N, L, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, last_token_index(attention_mask)]  # (N, H)
    dtype = next(head.parameters()).dtype
    return head(pooled.to(dtype))[:, 0].float()
