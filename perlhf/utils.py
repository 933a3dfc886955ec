"""Small runtime helpers."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def full_parameters(
    trainer: Any, module: torch.nn.Module, writeback: bool = False
) -> contextlib.AbstractContextManager:
    """Context in which ``module``'s parameters are whole on every rank, under strategies that
    shard them (FSDP; DeepSpeed ZeRO-3): what generation and ``save_pretrained`` need outside
    the training forward. Collective under those strategies (every rank must enter); a no-op
    otherwise."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=writeback)
    if type(strategy).__name__ == "DeepSpeedStrategy" and strategy.zero_stage_3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
