"""Small runtime helpers."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on CPU (MiB).

    Kept beside Lightning's ``DeviceStatsMonitor``: on CPU that logs utilisation percentages only,
    not the peak RSS that perlhf's CPU benchmarks and ``train/peak_memory_mb`` compare."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
