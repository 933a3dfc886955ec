"""Vision-language backbones: detection, LoRA targets on the language model, and the reward model.

A checkpoint is a vision-language model (VLM) when its config has a ``vision_config``; it loads
with ``AutoModelForImageTextToText`` and its processor with ``AutoProcessor``. LoRA goes on the
*language model's* attention projections by default (the vision tower stays frozen and
unadapted, as in the paper); ``LoraSpec.vision`` adds the vision tower's attention too. The
targets are one regex anchored at the language model's (and vision tower's) module path, found
by matching the sub-configs' ``model_type``, so a vision tower that names its projections like
the language model (``q_proj`` in SigLIP and Llama alike) is never adapted by accident.

Transformers has no sequence-classification class for VLMs, so ``VisionRewardModel`` is the VLM
trunk plus a scalar head on the final hidden state at the last non-pad token; it exports as the
trunk's peft adapter (or the merged trunk) plus ``reward_head.safetensors``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils.peft_utils import find_adapter_config_file

REWARD_HEAD = "reward_head.safetensors"
"""File holding a ``VisionRewardModel``'s scalar head next to the trunk's export."""

VISION_ATTENTION_TARGETS: dict[str, str] = {
    "clip_vision_model": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "siglip_vision_model": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "idefics3_vision": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "qwen2_vl_vision": r"attn\.(qkv|proj)",
}
"""Attention projections of vision towers (``vision_config.model_type``), as a regex of the
module path below each attention block's parent (for ``LoraSpec.vision``)."""


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes an image-text model (it carries a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def submodule_path(model: nn.Module, config: PretrainedConfig, what: str) -> str:
    """Module path of the sub-model built from ``config`` (the language model or the vision
    tower): the shortest path to a ``PreTrainedModel`` of the same ``model_type``."""
    for name, module in model.named_modules():
        if name and isinstance(module, PreTrainedModel) and module.config.model_type == config.model_type:
            return name
    raise ValueError(
        f"cannot find the {what} ({config.model_type!r}) inside {type(model).__name__}; set "
        "model.lora.target_modules to the module names to adapt"
    )


def lora_target_regex(model: PreTrainedModel, text_targets: list[str] | str, vision: bool) -> str:
    """One regex (peft full-matches it against module paths) selecting the language model's
    attention projections ``text_targets`` and, with ``vision``, the vision tower's."""
    if isinstance(text_targets, str):
        raise ValueError(
            f"language model {model.config.get_text_config().model_type!r} has regex LoRA targets; set "
            "model.lora.target_modules explicitly for this VLM"
        )
    text_path = submodule_path(model, model.config.get_text_config(), "language model")
    parts = [rf"{re.escape(text_path)}\..*\.({'|'.join(map(re.escape, text_targets))})"]
    if vision:
        vision_config = model.config.vision_config
        fragment = VISION_ATTENTION_TARGETS.get(vision_config.model_type)
        if fragment is None:
            raise ValueError(
                f"no default LoRA targets for vision tower {vision_config.model_type!r}; set "
                "model.lora.target_modules (a regex over module paths) or model.lora.vision: false"
            )
        vision_path = submodule_path(model, vision_config, "vision tower")
        parts.append(rf"{re.escape(vision_path)}\..*\.{fragment}")
    return "|".join(f"(?:{part})" for part in parts)


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``(N,)`` of each row's last attended position (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class VisionRewardModel(nn.Module):
    """A VLM trunk (LoRA-wrapped or not) and a trainable scalar head.

    The score of a sequence is ``head(h_last)``, ``h_last`` the language model's final hidden
    state at the last attended token: ``(N, L)`` ids + image inputs -> ``logits`` ``(N, 1)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        config = _hf(backbone).config.get_text_config()
        if head is None:
            head = nn.Linear(config.hidden_size, 1, bias=False)
            nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
        self.score = head

    @property
    def config(self) -> PretrainedConfig:
        return _hf(self.backbone).config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision: Any
    ) -> SequenceClassifierOutput:
        # The body (language model + vision tower, no LM head): LoRA layers sit inside it.
        body = _hf(self.backbone).base_model
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision
        ).last_hidden_state  # (N, L, H)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return SequenceClassifierOutput(logits=self.score(pooled.to(self.score.weight.dtype)))  # (N, 1)

    def merge_and_unload(self) -> VisionRewardModel:
        """The same reward model with the adapter merged into the trunk (plain transformers)."""
        return VisionRewardModel(self.backbone.merge_and_unload(), self.score)

    def save_pretrained(self, path: str | Path) -> Path:
        """Trunk (peft adapter folder or full model) plus ``reward_head.safetensors``."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        save_file({"weight": self.score.weight.detach().contiguous()}, path / REWARD_HEAD)
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base: str | None = None, **load_kwargs: Any
    ) -> VisionRewardModel:
        """Load an export of ``save_pretrained``: an adapter (merged onto ``base`` or the
        adapter's recorded base model) or a merged trunk, and the head."""
        path = str(path)
        if find_adapter_config_file(path) is not None:
            from peft import PeftConfig

            base = base or PeftConfig.from_pretrained(path).base_model_name_or_path
            if not base:
                raise ValueError(
                    f"reward_model={path!r} is an adapter that names no base model; set reward_base"
                )
            trunk = AutoModelForImageTextToText.from_pretrained(base, **load_kwargs)
            trunk = PeftModel.from_pretrained(trunk, path).merge_and_unload()
        else:
            trunk = AutoModelForImageTextToText.from_pretrained(path, **load_kwargs)
        weight = load_file(str(Path(path) / REWARD_HEAD))["weight"]
        head = nn.Linear(weight.shape[1], 1, bias=False)
        head.weight.data.copy_(weight)
        return cls(trunk, head)


def has_reward_head(path: str | Path) -> bool:
    """Whether ``path`` is a local ``VisionRewardModel`` export."""
    return (Path(path) / REWARD_HEAD).is_file()
