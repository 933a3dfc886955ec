"""Scaling out: a LoRA-aware FSDP auto-wrap policy, FSDP/DeepSpeed helpers with perlhf's defaults.

``lora_wrap_policy`` is a plain function with torch FSDP's ``(module, recurse, nonwrapped_numel)``
signature, so a LightningCLI config names it by its dotted path (``configs/scale/8gpu-fsdp.yaml``)::

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.FSDPStrategy
        init_args:
          auto_wrap_policy: perlhf.strategies.lora_wrap_policy
          state_dict_type: full

In Python, ``Trainer(strategy=fsdp_strategy())`` is the same. ``fsdp_units`` lists the units FSDP
will build from a model, to check a wrapping before paying for a GPU job. ``HFDeepSpeedStrategy``
is Lightning's DeepSpeed strategy with transformers' ZeRO-3 loading switched on.
``gathered_params`` makes sharded parameters whole for code that runs outside the Trainer's
forward (sampling, export).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

# Fallback for modules outside transformers' modelling files (no ``_no_split_modules`` to read).
_BLOCK_NAME = re.compile(r"(DecoderLayer|EncoderLayer|Block|Layer)$")

# What the policy learns on the way down FSDP's traversal (pre-order ``recurse=True`` calls) and
# uses on the way up (post-order ``recurse=False`` calls). Keyed weakly by module: nothing outlives
# the model and two models never share an entry.
_MIXED_UNIT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_TIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@functools.cache
def _no_split_names(module_name: str) -> frozenset[str]:
    """Union of ``_no_split_modules`` of the ``PreTrainedModel`` classes found in a Python module
    (a transformers ``modeling_*.py``, or a trust-remote-code one)."""
    source = sys.modules.get(module_name)
    if source is None or "transformers" not in sys.modules:
        return frozenset()
    from transformers import PreTrainedModel

    names: set[str] = set()
    for obj in list(vars(source).values()):
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel):
            names.update(getattr(obj, "_no_split_modules", None) or ())
    return frozenset(names)


def is_transformer_block(module: nn.Module) -> bool:
    """Whether ``module`` is a transformer block, judged from the module alone.

    A class (or a base class) of a transformers modelling file is a block when that file's
    ``PreTrainedModel`` lists it in ``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``,
    ``Qwen2DecoderLayer``…); other classes of such a file are not. A class from anywhere else
    counts when its name ends with ``DecoderLayer``, ``EncoderLayer``, ``Block`` or ``Layer`` and
    it has sub-modules with parameters. peft's tuner layers never count.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        return False
    cls = type(module)
    if any(base.__name__ in _no_split_names(base.__module__) for base in cls.__mro__):
        return True
    if _no_split_names(cls.__module__):
        return False
    return bool(_BLOCK_NAME.search(cls.__name__)) and any(
        True for child in module.children() for _ in child.parameters()
    )


def _is_mixed(module: nn.Module) -> bool:
    return len({p.requires_grad for p in module.parameters()}) == 2


def _mark_tied(root: nn.Module) -> None:
    """Flag the modules that must not become units because of tied (shared) weights.

    FSDP puts a shared parameter in the first unit that claims it and frees it after that unit's
    forward, so the unit must enclose every module using it: only the holders' lowest common
    ancestor or a module above it may claim it, never a module on the way down to one holder.
    """
    modules = dict(root.named_modules())
    holders: dict[int, list[str]] = {}
    for name, module in modules.items():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    for module in modules.values():
        _TIED[module] = False
    for names in holders.values():
        if len(names) < 2:
            continue
        paths = [name.split(".") if name else [] for name in names]
        common = 0
        while all(len(p) > common and p[common] == paths[0][common] for p in paths):
            common += 1
        for path in paths:
            for depth in range(common + 1, len(path) + 1):
                _TIED[modules[".".join(path[:depth])]] = True


def lora_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy that keeps trainable and frozen parameters in separate flat params.

    Wraps (1) every transformer block (``is_transformer_block``) and (2), inside any unit that
    would otherwise mix trainable and frozen parameters, each module whose parameters all require
    grad and are not yet in a wrapped descendant: under LoRA every ``lora_A``/``lora_B`` Linear,
    the trainable copy of the score head and the RL value head. Frozen flat params then get no
    gradient buffers and no gradient reduce-scatter; trainable units are small (each adds a
    small all-gather and reduce-scatter per step). Under full fine-tuning a block is all
    trainable, so only blocks are wrapped (plus trainable leaves beside a frozen reference model).
    Tied weights are never split from their users. The split also lets a bf16 frozen backbone
    sit beside float32 adapters (FSDP needs one dtype per flat param).

    Architecture-agnostic: blocks are recognised from the module itself, so the policy is a plain
    function, named in YAML as ``perlhf.strategies.lora_wrap_policy``. A single module holding
    both kinds (a frozen Linear with a trainable bias, peft ``bias="all"``) cannot be split;
    ``fsdp_units`` shows such a unit, and ``use_orig_params=True`` tolerates it.
    """
    if recurse:
        # Pre-order: decide, for the children, whether the unit they fall into mixes.
        if module not in _MIXED_UNIT:  # the root of the traversal
            _mark_tied(module)
            _MIXED_UNIT[module] = _is_mixed(module)
        mixed = _is_mixed(module) if is_transformer_block(module) else _MIXED_UNIT[module]
        for child in module.children():
            _MIXED_UNIT[child] = mixed
        return True
    if nonwrapped_numel == 0:
        return False
    if is_transformer_block(module):
        return True
    return (
        _MIXED_UNIT.get(module, True)
        and not _TIED.get(module, False)
        and all(p.requires_grad for p in module.parameters())
    )


def fsdp_units(root: nn.Module, policy: Callable[..., bool] = lora_wrap_policy) -> dict[str, list[str]]:
    """The units FSDP builds from ``root`` under ``policy``, without wrapping anything.

    Follows torch's recursive auto-wrap (pre-order ``recurse=True`` calls, post-order
    ``recurse=False`` calls with the numel left over; the root is always a unit). Returns
    ``{module name ("" = root): names of the parameters its flat param holds}``.
    """
    claimed: set[int] = set()
    units: dict[str, list[str]] = {}

    def unclaimed(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
        out, seen = [], set()
        for name, param in module.named_parameters(prefix=prefix, remove_duplicate=False):
            if id(param) not in claimed and id(param) not in seen:
                seen.add(id(param))
                out.append((name, param))
        return out

    def visit(module: nn.Module, prefix: str, is_root: bool) -> None:
        numel = sum(p.numel() for _, p in unclaimed(module, prefix))
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name, is_root=False)
        left = unclaimed(module, prefix)
        if is_root or policy(module=module, recurse=False, nonwrapped_numel=sum(p.numel() for _, p in left)):
            units[prefix] = [name for name, _ in left]
            claimed.update(id(p) for _, p in left)

    for module in root.modules():  # start afresh, as FSDP's traversal of ``root`` would
        _MIXED_UNIT.pop(module, None)
    visit(root, "", is_root=True)
    return units


def fsdp_strategy(**overrides: Any) -> FSDPStrategy:
    """Lightning ``FSDPStrategy`` with perlhf's defaults, for ``Trainer(strategy=...)`` in Python.

    ``auto_wrap_policy=lora_wrap_policy``, ``use_orig_params=True`` (the optimiser sees the
    original trainable parameters), ``state_dict_type="full"`` (one checkpoint file, loadable on
    any number of devices), ``sharding_strategy="FULL_SHARD"``, ``limit_all_gathers=True``.
    ``overrides`` replace or extend these (any ``FSDPStrategy`` or torch FSDP argument). Use it on
    two or more devices: on one, FSDP falls back to ``NO_SHARD``.
    """
    kwargs: dict[str, Any] = {
        "auto_wrap_policy": lora_wrap_policy,
        "use_orig_params": True,
        "state_dict_type": "full",
        "sharding_strategy": "FULL_SHARD",
        "limit_all_gathers": True,
    }
    return FSDPStrategy(**{**kwargs, **overrides})


class HFDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same arguments) that also switches on transformers'
    ZeRO-3 integration.

    Under ZeRO-3 Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``, which partitions
    every parameter as it is created; ``from_pretrained`` then only loads weights into the
    partitions (and peft only copies the score head) when transformers' own ZeRO-3 flag, a live
    ``HfDeepSpeedConfig``, is set. This strategy holds one from ``configure_model`` until teardown,
    so ``generate`` also keeps the ranks in step (``synced_gpus``). Models loaded before
    ``configure_model`` (the RL reward model, owned by the DataModule) stay whole. Stages 0-2
    behave exactly as ``DeepSpeedStrategy``.
    """

    _hf_deepspeed_config: Any = None

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        self._init_config_if_needed()
        if self.zero_stage_3 and self._hf_deepspeed_config is None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        with super().model_sharded_context():
            yield

    def teardown(self) -> None:
        super().teardown()
        self._hf_deepspeed_config = None


def is_sharded(trainer_or_strategy: Any) -> bool:
    """Whether the strategy shards parameters across ranks (FSDP, DeepSpeed ZeRO-3)."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    if isinstance(strategy, FSDPStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3)


@contextlib.contextmanager
def gathered_params(trainer_or_strategy: Any) -> Iterator[None]:
    """Every parameter whole on every rank inside the block, sharded again after it.

    A no-op unless the strategy shards parameters (FSDP, DeepSpeed ZeRO-3). All ranks must enter
    it together. Needed around model calls outside the Trainer's own forward, such as the RL
    rollout's ``generate``: under FSDP the root unit's parameters (embeddings, final norm, head)
    stay sharded outside it. Costs the whole model's memory on every device for the block;
    changes made inside are discarded.
    """
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(strategy.model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
                yield
            return
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and strategy.model is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(strategy.model.parameters()), modifier_rank=None):
            yield
        return
    yield
