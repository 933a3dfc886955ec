"""Policy, reference and critic on one frozen backbone (or separate ones), and their forwards.

Under LoRA the default is one set of frozen weights serving three roles: the ``policy`` adapter
is the actor, the backbone with adapters disabled is the reference policy (no second copy), and a
``value`` adapter plus a scalar head is the critic. That sharing is where PE-RLHF's memory saving
comes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from perlhf.losses import entropy_from_logits, logprobs_from_logits
from perlhf.models import ModelConfig, build_causal_lm, load_pretrained
from perlhf.vlm import is_vision_language

POLICY, VALUE = "policy", "value"


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Route a peft model's LoRA layers through adapter ``name`` for the block.

    Unlike ``PeftModel.set_adapter``, this leaves ``requires_grad`` alone, so one optimiser can
    train several adapters of one backbone.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [layer.active_adapters for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, names in zip(layers, previous, strict=True):
            layer._active_adapter = names


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the bare backbone (the reference policy) for the block.

    ``PeftModel.disable_adapter`` re-enables through ``set_adapter`` on exit, which turns
    ``requires_grad`` off for every adapter but the active one (here: the critic's); flipping the
    layers' flag directly keeps every adapter trainable.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, previous, strict=True):
            layer._disable_adapters = disabled


def add_value_adapter(policy: PeftModel, cfg: ModelConfig) -> None:
    """A second LoRA adapter, ``value``, on the policy's backbone (same targets and rank)."""
    config = policy.peft_config[POLICY]
    policy.add_adapter(VALUE, type(config)(**{**config.to_dict(), "inference_mode": False}))
    for name, param in policy.named_parameters():
        if f".{VALUE}." in name:
            param.requires_grad_(True)


def frozen_causal_lm(cfg: ModelConfig, name_or_path: str) -> nn.Module:
    return load_pretrained(cfg, name_or_path).requires_grad_(False).eval()


def value_backbone(cfg: ModelConfig, name_or_path: str | None) -> nn.Module:
    """A separate critic trunk, fine-tuned like the policy (LoRA or full)."""
    value_cfg = ModelConfig.coerce({**cfg.__dict__, "name_or_path": name_or_path or cfg.name_or_path})
    return build_causal_lm(value_cfg, adapter_name=VALUE)


def hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them: ``(N, T)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    **vision: Any,
) -> torch.Tensor:
    """Last hidden states at the positions that predict each response token: ``(N, R, H)``.

    Runs the transformer body only (no LM head over the prompt); ``input_ids`` is prompt
    ``(N, P)`` followed by response ``(N, R)``. ``vision`` holds a VLM's image inputs for the
    rows (``pixel_values``…, see ``perlhf.data.images.combine_vision``).
    """
    hf = hf_model(model)
    # A VLM places its own positions (multimodal RoPE in Qwen2-VL); its language models use RoPE,
    # which left padding cannot shift. Absolute-position text models need padding-aware positions.
    positions = None if is_vision_language(hf.config) else position_ids(attention_mask)
    out = hf.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=False,  # one pass over whole sequences: a KV cache would only cost memory
        **vision,
    )
    return out.last_hidden_state[:, prompt_len - 1 : -1]


def token_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    response_ids: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(N, R)`` of the sampled tokens under the sampling temperature, and entropy."""
    logits = hf_model(model).get_output_embeddings()(hidden).float() / temperature
    entropy = entropy_from_logits(logits.detach()) if with_entropy else None
    return logprobs_from_logits(logits, response_ids), entropy
