"""Shuffling that survives a resume."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """Random order drawn from ``(seed, epoch)`` alone.

    A ``RandomSampler`` with a generator carries its state across epochs, so a run resumed from
    a checkpoint would see epochs in a different order than the uninterrupted run. Lightning calls
    ``set_epoch`` before each epoch, so here epoch ``e`` has the same order however it is reached.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.num_samples = len(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
