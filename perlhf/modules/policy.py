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
from transformers import GenerationConfig

from perlhf.losses import entropy_from_logits, logprobs_from_logits
from perlhf.models import ModelConfig, build_causal_lm, enable_checkpointing, load_pretrained
from perlhf.packing import PackedGroups
from perlhf.scoring import position_ids
from perlhf.vlm import is_vision_language

POLICY, VALUE, REFERENCE = "policy", "value", "reference"


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


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The tensors of adapter ``name``, in module order, taken from the LoRA layers' per-adapter
    containers (``lora_A[name]``…), never by parameter name: a backbone module that happens to be
    called ``value`` or ``reference`` is not part of an adapter."""
    params: list[nn.Parameter] = []
    for layer in (m for m in model.modules() if isinstance(m, BaseTunerLayer)):
        for attribute in layer.adapter_layer_names:
            container = getattr(layer, attribute)
            if name in container:
                part = container[name]
                params.extend(part.parameters() if isinstance(part, nn.Module) else [part])
    return params


def add_value_adapter(policy: PeftModel, cfg: ModelConfig) -> None:
    """A second LoRA adapter, ``value``, on the policy's backbone (same targets and rank)."""
    config = policy.peft_config[POLICY]
    policy.add_adapter(VALUE, type(config)(**{**config.to_dict(), "inference_mode": False}))
    for param in adapter_parameters(policy, VALUE):
        param.requires_grad_(True)


@torch.no_grad()
def start_from_adapter(policy: PeftModel, path: str) -> None:
    """Start the ``policy`` adapter from a trained one (a peft folder, e.g. an SFT LoRA export) and
    keep a frozen copy of it as adapter ``reference``: with a non-fresh adapter the reference
    policy is the starting policy, not the backbone with adapters disabled.

    The adapter must have the policy's shape (``model.lora`` rank and targets)."""
    policy.load_adapter(path, adapter_name=REFERENCE, is_trainable=False)
    source, target = adapter_parameters(policy, REFERENCE), adapter_parameters(policy, POLICY)
    if not source or [p.shape for p in source] != [p.shape for p in target]:
        raise ValueError(
            f"policy_adapter={path!r} does not have the policy adapter's shape ({len(source)} vs "
            f"{len(target)} tensors); set model.lora to the adapter's rank and target modules"
        )
    for dst, src in zip(target, source, strict=True):
        dst.copy_(src).requires_grad_(True)
        src.requires_grad_(False)
    for layer in (m for m in policy.modules() if isinstance(m, BaseTunerLayer)):
        if REFERENCE in getattr(layer, "scaling", {}):  # the adapter's own alpha / r
            layer.scaling[POLICY] = layer.scaling[REFERENCE]


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[bool]:
    """Fold each active LoRA update into its base weight for the block; yields whether it did.

    Generation then runs plain ``W' x`` matmuls instead of ``W x + B A x`` per adapted layer (and
    per decoded token). Exact and reversible: ``W' = W + scale * B @ A`` is a new tensor that
    stands in for the base weight while the adapters are disabled, and the original parameter
    objects (bit-identical, still in the optimiser) come back afterwards; peft's in-place
    merge/unmerge would drift the frozen weights by rounding at every rollout. Costs one copy of
    the adapted weights while the block runs. Skipped (yields False) for DoRA and quantised
    (non-float) base weights, and inside sharded strategies' gathered parameters, which the
    caller decides.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, BaseTunerLayer) and not m.disable_adapters and hasattr(m, "get_delta_weight")
    ]
    adapters = [[a for a in layer.active_adapters if a in getattr(layer, "lora_A", {})] for layer in layers]
    usable = all(
        layer.get_base_layer().weight.is_floating_point()
        and not any(getattr(layer, "use_dora", {}).get(a, False) for a in names)
        for layer, names in zip(layers, adapters, strict=True)
    )
    if not layers or not usable:
        yield False
        return
    saved: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer, names in zip(layers, adapters, strict=True):
                base = layer.get_base_layer()
                weight = base.weight
                merged = weight.detach().clone()
                for name in names:
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                saved.append((base, weight))
                base.weight = nn.Parameter(merged, requires_grad=False)
        with _adapter_state(layers, [(list(layer.active_adapters), True) for layer in layers]):
            yield True
    finally:
        for base, weight in saved:
            base.weight = weight


def recompute_under_forward_adapters(model: nn.Module) -> None:
    """Make activation checkpointing recompute each block under the adapter state of its forward.

    ``active_adapter``/``adapters_disabled`` only hold inside their block, but a checkpointed block
    is recomputed in the backward pass, after the block has exited: the critic's blocks would be
    recomputed through the policy adapter and give the value adapter wrong gradients. The
    recompute context restores the active adapters and the disabled flag the forward saw.
    """
    layers: list[BaseTunerLayer] = []

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if not layers:
            layers.extend(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        state = [(list(layer.active_adapters), layer.disable_adapters) for layer in layers]
        return contextlib.nullcontext(), _adapter_state(layers, state)

    enable_checkpointing(hf_model(model), context_fn)


@contextlib.contextmanager
def _adapter_state(layers: list[BaseTunerLayer], state: list[tuple[list[str], bool]]) -> Iterator[None]:
    previous = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer, (names, disabled) in zip(layers, state, strict=True):
        layer._active_adapter, layer._disable_adapters = names, disabled
    try:
        yield
    finally:
        for layer, (names, disabled) in zip(layers, previous, strict=True):
            layer._active_adapter, layer._disable_adapters = names, disabled


@contextlib.contextmanager
def clean_generation_config(model: nn.Module) -> Iterator[None]:
    """Sample with transformers' neutral defaults for the block, not the checkpoint's own
    ``generation_config`` (repetition penalty, top-p/top-k, n-gram bans…), which ``generate``
    merges under any keyword arguments: the sampler must be the policy that is optimised,
    ``softmax(logits / T)``. Special-token ids are kept."""
    hf = hf_model(model)
    saved = hf.generation_config
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    hf.generation_config = GenerationConfig(**{name: getattr(saved, name, None) for name in ids})
    try:
        yield
    finally:
        hf.generation_config = saved


NEUTRAL_SAMPLING: dict[str, float | int] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
"""Sampling settings ``generate`` would otherwise take from transformers' global defaults
(``top_k=50``)."""


def frozen_causal_lm(cfg: ModelConfig, name_or_path: str) -> nn.Module:
    return load_pretrained(cfg, name_or_path).requires_grad_(False).eval()


def value_backbone(cfg: ModelConfig, name_or_path: str | None) -> nn.Module:
    """A separate critic trunk, fine-tuned like the policy (LoRA or full)."""
    value_cfg = ModelConfig.coerce({**cfg.__dict__, "name_or_path": name_or_path or cfg.name_or_path})
    return build_causal_lm(value_cfg, adapter_name=VALUE)


def hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


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


def packed_response_hidden(model: nn.Module, packed: PackedGroups) -> torch.Tensor:
    """``response_hidden`` of rollout rows packed by prompt (``perlhf.packing.pack_groups``):
    ``(n, R, H)``, equal to the unshared rows' up to float rounding; one pass over the groups."""
    hf = hf_model(model)
    eager = hf.config._attn_implementation == "eager"
    out = hf.base_model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask(hf.dtype if eager else None),
        position_ids=packed.position_ids,
        use_cache=False,
    )
    return packed.hidden(out.last_hidden_state)


def token_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    response_ids: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(N, R)`` of the sampled tokens under the sampling temperature, and entropy."""
    logits = hf_model(model).get_output_embeddings()(hidden)  # (N, R, V), the compute dtype
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs_from_logits(logits, response_ids, temperature), entropy
