"""Backbones from a hub id or local path, with LoRA adapters (peft) or full fine-tuning.

``ModelConfig`` is the one knob group every perlhf module takes. ``build_reward_model`` and
``build_causal_lm`` load the backbone with ``from_pretrained`` (the real code path), freeze it and
add a LoRA adapter on the attention projections (the paper's choice), or leave every weight
trainable under ``finetune="full"`` (the baseline the paper compares against).

Memory switches, all in ``ModelConfig``: ``quantization`` loads the frozen backbone in 4-bit NF4
or 8-bit with bitsandbytes under the adapters (QLoRA; CUDA only), ``gradient_checkpointing``
recomputes each block's activations in the backward pass, and ``dtype`` sets the weights' load
dtype. Mixed precision itself is the Trainer's ``precision`` (``bf16-mixed`` etc.).

Vision-language checkpoints (a config with a ``vision_config``) load with
``AutoModelForImageTextToText`` instead, with LoRA on the language model (``perlhf.vlm``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from perlhf.hub import check_model_source
from perlhf.vlm import VisionRewardModel, is_vision_language, lora_target_regex, submodule_path

# Attention projections per architecture (``config.model_type``). GPT-2 style models name the
# attention output ``c_proj`` like the MLP output, so their target is a regex that matches the
# attention block only.
ATTENTION_TARGETS: dict[str, list[str] | str] = {
    "gpt2": r".*\.attn\.(c_attn|c_proj)$",
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_vl_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_5_vl_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
}

LORA_PRESETS = ("attention", "all-linear")
"""``LoraSpec.target_modules`` values that name a placement rather than modules."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "4bit", "8bit")
QLORA_INSTALL = 'pip install "perlhf[qlora]"'


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft ``LoraConfig``)."""

    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str | None = None
    """Which linear layers get an adapter. None or ``"attention"``: the architecture's attention
    projections (``ATTENTION_TARGETS``; the paper's placement). ``"all-linear"``: every linear
    layer of the transformer blocks, attention and MLP (for RL, attention-only LoRA
    underperforms; "LoRA Without Regret", 2025). Otherwise module names (suffix match) or one
    regex (full match). For a VLM the presets cover its language model only."""
    vision: bool = False
    """VLM backbones: also adapt the vision tower's attention projections (default: the vision
    tower stays frozen and unadapted). Ignored unless ``target_modules`` is a preset."""
    use_dora: bool = False
    """DoRA: learn a magnitude vector beside the low-rank direction update (peft ``use_dora``)."""
    use_rslora: bool = False
    """rsLoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (stable across ranks)."""
    layers: int | list[int] | None = None
    """Which transformer blocks get adapters. None: all. An int ``n``: the top ``n`` blocks only;
    the gradient then stops below them, so the backward pass and its stored activations shrink
    to those blocks (without gradient checkpointing). A list: those block indices (peft
    ``layers_to_transform``). Needs ``target_modules`` as a preset or a list of names."""
    init: bool | str = True
    """peft ``init_lora_weights``: True (B = 0, so a fresh adapter is the identity), ``"gaussian"``,
    ``"pissa"``, ``"olora"``…"""


@dataclass
class ModelConfig:
    """Which backbone to load and how to fine-tune it."""

    name_or_path: str = ""
    """Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), local folder in ``from_pretrained`` layout, or a
    ``.gguf`` file (read by transformers' GGUF loader and dequantised on every load; import it
    once with ``python -m perlhf.import_gguf`` for fast loads)."""
    finetune: Literal["lora", "full"] = "lora"
    """``lora``: frozen backbone + adapter; ``full``: every weight trains (the paper's baseline)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """Adapter settings, used when ``finetune="lora"``."""
    tokenizer: str | None = None
    """Tokenizer hub id or path; None: the model's own."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in. Keep float32 with a ``*-mixed`` Trainer precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, peft-compatible)."""
    disable_dropout: bool = False
    """Set every dropout probability of the backbone to 0 (TRL's reward-model default). Saves the
    dropout masks and, on CPU, lets attention use the fused kernel; matters for models trained
    with dropout (GPT-2, OPT), not for Llama/Qwen-style ones (no dropout). ``PPOModule`` always
    runs without dropout."""
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``…; None: transformers' default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust the source."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA: load the frozen backbone quantised with bitsandbytes, ``4bit`` (NF4 with double
    quantisation) or ``8bit`` (LLM.int8), on the current CUDA device; adapters and score/value
    heads stay unquantised. LoRA only; needs a CUDA GPU and ``pip install "perlhf[qlora]"``.
    Pair it with Trainer ``precision: bf16-mixed`` (or ``32-true``), not ``*-true`` half precision."""
    quantization_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype 4-bit layers dequantise to for their matmuls; ``float16`` on GPUs without bf16
    (pre-Ampere, e.g. T4/V100)."""

    def __post_init__(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.lora.r < 1:
            raise ValueError(f"model.lora.r must be a positive rank, got {self.lora.r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"model.quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.quantization_compute_dtype not in DTYPES:
            raise ValueError(
                f"model.quantization_compute_dtype must be one of {list(DTYPES)}, "
                f"got {self.quantization_compute_dtype!r}"
            )
        if self.quantization != "none" and self.finetune == "full":
            raise ValueError(
                f"model.quantization={self.quantization!r} does not work with finetune: full "
                "(quantised weights cannot be trained); use finetune: lora (QLoRA), or "
                "quantization: none for full fine-tuning"
            )

    @property
    def tokenizer_name_or_path(self) -> str:
        return self.tokenizer or self.name_or_path

    @property
    def tokenizer_key(self) -> str:
        """The config key ``tokenizer_name_or_path`` comes from, named in errors."""
        return "model.tokenizer" if self.tokenizer else "model.name_or_path"

    @classmethod
    def coerce(cls, value: ModelConfig | dict) -> ModelConfig:
        """Accept the plain dict a checkpoint's hyperparameters hold (see ``asdict``)."""
        if isinstance(value, cls):
            return value
        value = dict(value)
        lora = value.pop("lora", {})
        return cls(lora=lora if isinstance(lora, LoraSpec) else LoraSpec(**lora), **value)


def pretrained_location(name_or_path: str | Path) -> tuple[str, dict]:
    """``(name_or_path, {})``, or for a ``.gguf`` file ``(its folder, {"gguf_file": its name})``:
    the arguments ``from_pretrained`` takes for either."""
    path = str(name_or_path)
    if path.endswith(".gguf"):
        gguf = Path(path)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {path!r} does not exist; check model.name_or_path")
        return str(gguf.parent), {"gguf_file": gguf.name}
    return path, {}


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, what: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; if it has no pad token, pad with eos (the usual choice for decoder LMs).
    ``what`` is the config key of ``name_or_path``, named in errors."""
    location, extra = pretrained_location(name_or_path)
    if not extra:
        check_model_source(name_or_path, what)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {name_or_path!r} has neither a pad nor an eos token; add a pad token "
                "to the tokenizer before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_kwargs(cfg: ModelConfig) -> dict:
    """``from_pretrained`` keyword arguments; with ``quantization`` also the bitsandbytes config
    and a ``device_map`` onto the current CUDA device (every frozen copy, e.g. a separate
    reference policy, loads through here and so is quantised like the policy)."""
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    kwargs["dtype"] = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs | _quantization_kwargs(cfg)


def _quantization_kwargs(cfg: ModelConfig) -> dict:
    if cfg.quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise ValueError(
            f"model.quantization={cfg.quantization!r} needs a CUDA GPU (bitsandbytes); use "
            "quantization: none on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"model.quantization={cfg.quantization!r} needs the bitsandbytes package: {QLORA_INSTALL}, "
            "or set quantization: none"
        ) from err
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[cfg.quantization_compute_dtype],
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Quantised weights cannot be moved after loading: place the whole model on this process's
    # device (under DDP each rank has selected its own before ``configure_model``).
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def is_vlm(cfg: ModelConfig, name_or_path: str | None = None) -> bool:
    """Whether the checkpoint (``cfg.name_or_path`` unless given) is a vision-language model."""
    location, extra = pretrained_location(name_or_path or cfg.name_or_path)
    if not extra:
        check_model_source(location)
    config = AutoConfig.from_pretrained(
        location, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **extra
    )
    return is_vision_language(config)


def load_pretrained(cfg: ModelConfig, name_or_path: str | None = None) -> PreTrainedModel:
    """A generative backbone: ``AutoModelForImageTextToText`` for a VLM, else ``AutoModelForCausalLM``."""
    path = name_or_path or cfg.name_or_path
    auto = AutoModelForImageTextToText if is_vlm(cfg, path) else AutoModelForCausalLM
    location, extra = pretrained_location(path)
    return dequantised(auto.from_pretrained(location, **_load_kwargs(cfg), **extra))


def dequantised(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that ``model`` came from a GGUF file. transformers dequantises GGUF weights to
    ordinary float tensors on load but keeps a GGUF "quantizer" that refuses ``save_pretrained``
    (so exports, merges and checkpoints of such a model would fail)."""
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        del model.config.quantization_config
    return model


def build_reward_model(cfg: ModelConfig, pad_token_id: int) -> nn.Module:
    """Sequence classifier with one scalar output per sequence, LoRA-wrapped unless ``full``.

    The score head is always trainable (peft's ``modules_to_save``) and saved with the adapter.
    A VLM becomes a ``VisionRewardModel``: its trunk (LoRA on the language model) + a scalar head.
    """
    if not cfg.name_or_path:
        raise ValueError("model.name_or_path is empty: set a hub id or a local model folder")
    if is_vlm(cfg):
        trunk = AutoModelForImageTextToText.from_pretrained(cfg.name_or_path, **_load_kwargs(cfg))
        return VisionRewardModel(_finish(trunk, cfg, task_type=None))
    location, extra = pretrained_location(cfg.name_or_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=1, **_load_kwargs(cfg), **extra
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"model.name_or_path={cfg.name_or_path!r} has no sequence-classification variant in "
                "transformers (AutoModelForSequenceClassification); a reward model needs a "
                "backbone that supports one (e.g. GPT-2, Llama, Qwen2, Mistral, Gemma)"
            ) from err
        raise
    model = dequantised(model)
    # HF pools the score at the last non-pad token, so the model must know the pad id.
    model.config.pad_token_id = pad_token_id
    # A reward model never generates. With the use_cache=True of GPT-2/Llama/Qwen configs every
    # training forward would copy all layers' keys and values into a KV cache nothing reads
    # (2·layers·N·L·hidden floats, alive at the activation peak).
    model.config.use_cache = False
    return _finish(model, cfg, task_type="SEQ_CLS")


def build_causal_lm(cfg: ModelConfig, adapter_name: str = "default") -> nn.Module:
    """Causal LM (policy), LoRA-wrapped under ``adapter_name`` unless ``full``."""
    if not cfg.name_or_path:
        raise ValueError("model.name_or_path is empty: set a hub id or a local model folder")
    try:
        model = load_pretrained(cfg)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"model.name_or_path={cfg.name_or_path!r} is not a causal language model "
                "(AutoModelForCausalLM cannot load it); the policy must be a decoder LM"
            ) from err
        raise
    return _finish(model, cfg, task_type="CAUSAL_LM", adapter_name=adapter_name)


def default_lora_targets(
    model: PreTrainedModel, vision: bool = False, preset: str = "attention"
) -> list[str] | str:
    """LoRA targets of a ``preset`` (``LORA_PRESETS``): the attention projections of ``model``, or
    every linear layer of its transformer blocks; for a VLM those of its language model (and with
    ``vision`` the vision tower's attention) as one regex over module paths."""
    vlm = is_vision_language(model.config)
    if vision and not vlm:
        raise ValueError(
            "model.lora.vision=True needs a vision-language backbone; this one has no vision tower"
        )
    if preset == "all-linear":
        names = block_linear_names(model, vlm)
        return lora_target_regex(model, names, vision) if vlm else names
    model_type = model.config.get_text_config().model_type if vlm else model.config.model_type
    if model_type not in ATTENTION_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model type {model_type!r}; set model.lora.target_modules "
            "to the attention projection names of this architecture "
            f"(e.g. {ATTENTION_TARGETS['llama']}) or to 'all-linear'"
        )
    if vlm:
        return lora_target_regex(model, ATTENTION_TARGETS[model_type], vision)
    return ATTENTION_TARGETS[model_type]


def block_linear_names(model: nn.Module, vlm: bool = False) -> list[str]:
    """Sorted leaf names of the linear layers inside numbered transformer blocks (``...layers.3.
    mlp.up_proj`` → ``up_proj``); a VLM's language model only. Heads (``lm_head``, ``score``) and
    embeddings sit outside the blocks and are never included."""
    prefix = ""
    if vlm:
        prefix = submodule_path(model, model.config.get_text_config(), "language model") + "."
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if _is_linear(module) and name.startswith(prefix) and re.search(r"\.\d+\.", name)
    }
    if not names:
        raise ValueError("model.lora.target_modules='all-linear': no linear layer inside numbered blocks")
    return sorted(names)


def check_targets(model: nn.Module, targets: list[str] | str) -> None:
    """Raise if a LoRA target matches no module (peft's own error names none of the candidates)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(f"model.lora.target_modules regex {targets!r} matches no module of the model")
        return
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    missing = [t for t in targets if t not in leaves and not any(n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(
            f"model.lora.target_modules {missing} match no module of the model; linear layers "
            f"available: {linear}; presets: {list(LORA_PRESETS)}"
        )


def _targets_conv1d(model: nn.Module, targets: list[str] | str) -> bool:
    """Whether a LoRA target is a transformers ``Conv1D`` (GPT-2 style: weight ``(in, out)``)."""
    for name, module in model.named_modules():
        if type(module).__name__ != "Conv1D":
            continue
        if isinstance(targets, str):
            if re.fullmatch(targets, name):
                return True
        elif any(name == t or name.endswith("." + t) for t in targets):
            return True
    return False


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def enable_checkpointing(model: PreTrainedModel, context_fn: Callable | None = None) -> None:
    """Non-reentrant activation checkpointing on every block of a transformers model;
    ``context_fn``: ``torch.utils.checkpoint``'s (forward, recompute) context factory."""
    kwargs: dict = {"use_reentrant": False} | ({"context_fn": context_fn} if context_fn else {})
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def checkpointing_in_eval(model: nn.Module) -> Iterator[None]:
    """Keep activation checkpointing on for the block while ``model`` is in eval mode.

    transformers checkpoints a layer only while its ``training`` flag is set, so a module that
    trains in eval mode (``PPOModule``: no dropout, so rollout and update log-probs agree) would
    silently keep every activation. This sets the flag on the modules that carry
    ``gradient_checkpointing=True`` alone (the blocks, and the model body that drops its KV cache
    for them), not on their children, so dropout stays off; it is restored on exit. Use it
    around forward/backward passes only: checkpointed layers drop the KV cache, so never around
    ``generate``.
    """
    flipped = [
        m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and not m.training
    ]
    for module in flipped:
        module.training = True
    try:
        yield
    finally:
        for module in flipped:
            module.training = False


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: ``nn.Dropout`` modules and the float ``attention_dropout``
    attributes that Llama-style attention passes to its kernel."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _finish(
    model: PreTrainedModel, cfg: ModelConfig, task_type: str | None, adapter_name: str = "default"
) -> nn.Module:
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.finetune == "full":
        model.requires_grad_(True)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        return model

    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules or "attention"
    if targets in LORA_PRESETS:
        targets = default_lora_targets(model, cfg.lora.vision, targets)
    check_targets(model, targets)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Freezes the quantised base and upcasts its remaining half-precision weights (norms,
        # embeddings, heads) to float32; checkpointing is switched on below, non-reentrant.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        # Frozen embeddings produce inputs without grad; make them require grad so checkpointed
        # blocks still propagate gradients to the adapters (what reentrant checkpointing needs;
        # harmless with the non-reentrant kind); recent transformers already hook it on enabling.
        if not getattr(model, "_require_grads_hooks", None):
            model.enable_input_require_grads()
    layers = adapted_layers(model, cfg.lora.layers)
    if layers is not None and isinstance(targets, str):
        raise ValueError(
            "model.lora.layers needs model.lora.target_modules as a preset or a list of module names, "
            f"not the regex {targets!r}"
        )
    lora = LoraConfig(
        task_type=task_type,
        layers_to_transform=layers,
        # GPT-2's Conv1D stores weights transposed; peft would set this itself, with a warning.
        fan_in_fan_out=_targets_conv1d(model, targets),
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        init_lora_weights=cfg.lora.init,
    )
    return get_peft_model(model, lora, adapter_name=adapter_name)


def adapted_layers(model: PreTrainedModel, layers: int | list[int] | None) -> list[int] | None:
    """Block indices of ``LoraSpec.layers`` (None: every block)."""
    if layers is None:
        return None
    n = model.config.get_text_config().num_hidden_layers
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"model.lora.layers={layers}: the model has {n} blocks; use 1..{n} (the top n)")
        return list(range(n - layers, n))
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"model.lora.layers {list(layers)}: block indices must lie in 0..{n - 1}, non-empty")
    return sorted(set(layers))


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of parameters that require grad (adapters, heads; all under ``full``)."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in keep}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())
