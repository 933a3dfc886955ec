"""Shuffling and loader positions that survive a resume."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Random order drawn from ``(seed, epoch)`` alone.

    A ``RandomSampler`` with a generator carries its state across epochs, so a run resumed from
    a checkpoint would see epochs in a different order than the uninterrupted run. Lightning calls
    ``set_epoch`` before each epoch, so here epoch ``e`` has the same order however it is reached.

    With ``lengths`` (one per example) the order is length-grouped for batches of ``batch_size``
    (``length_grouped``): batches hold examples of similar length, so little of each padded batch
    is padding, and the order still depends on ``(seed, epoch)`` alone. With ``groups`` (a group id
    per example, e.g. its prompt) each group's examples come one after another
    (``prompt_grouped``), groups and members in random order.
    """

    def __init__(
        self,
        data_source: Sized,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        group_batches: int = 50,
        groups: Sequence[int] | None = None,
    ) -> None:
        for name, values in (("lengths", lengths), ("groups", groups)):
            if values is not None and len(values) != len(data_source):
                raise ValueError(f"{name}: {len(values)} values for {len(data_source)} examples")
        if lengths is not None and groups is not None:
            raise ValueError("order examples by length or by group, not both")
        self.num_samples = len(data_source)
        self.seed = seed
        self.epoch = 0
        self.lengths, self.batch_size, self.group_batches = lengths, batch_size, group_batches
        self.groups = groups

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.groups is not None:
            return iter(prompt_grouped(order, self.groups))
        if self.lengths is None:
            return iter(order)
        return iter(length_grouped(order, self.lengths, self.batch_size, self.group_batches, generator))

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(
    dataset: Any, seed: int, batch_size: int, group_by_length: bool, group_by_prompt: bool = False
) -> EpochSeededSampler:
    """The training sampler of perlhf's text DataModules: ``(seed, epoch)``-ordered; with
    ``group_by_length`` length-grouped for batches of ``batch_size`` (``example_lengths``); with
    ``group_by_prompt`` each prompt's examples together (``prompt_ids``)."""
    lengths = example_lengths(dataset) if group_by_length else None
    groups = prompt_ids(dataset) if group_by_prompt else None
    return EpochSeededSampler(dataset, seed=seed, lengths=lengths, batch_size=batch_size, groups=groups)


def prompt_ids(dataset: Any) -> list[int]:
    """Per encoded pairwise example, an id of its prompt (its first ``prompt_length`` tokens):
    equal ids for equal prompts, numbered in order of first appearance."""
    ids: dict[tuple[int, ...], int] = {}
    chosen, lengths = dataset["chosen_input_ids"], dataset["prompt_length"]
    return [ids.setdefault(tuple(c[:n]), len(ids)) for c, n in zip(chosen, lengths, strict=True)]


def prompt_grouped(order: list[int], groups: Sequence[int]) -> list[int]:
    """``order`` (a shuffled index list) regrouped so each group's indices are consecutive: groups
    in the order of their first index in ``order``, members in their order there."""
    members: dict[int, list[int]] = {}
    for i in order:
        members.setdefault(groups[i], []).append(i)
    return [i for group in members.values() for i in group]


def example_lengths(dataset: Any) -> list[int]:
    """Per encoded example: the longer of its chosen and rejected sequences (pairwise), else the
    length of its ``input_ids``; what ``group_by_length`` sorts by."""
    if "chosen_input_ids" in dataset.column_names:
        chosen, rejected = dataset["chosen_input_ids"], dataset["rejected_input_ids"]
        return [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
    return [len(ids) for ids in dataset["input_ids"]]


def length_grouped(
    order: list[int], lengths: Sequence[int], batch_size: int, group_batches: int, generator: torch.Generator
) -> list[int]:
    """``order`` (a shuffled index list) regrouped by length, as "group by length" samplers do: cut
    into mega-batches of ``group_batches · batch_size`` indices, sort each by length (longest
    first), cut that into batches and shuffle the full batches within the mega-batch. A final
    partial batch stays last, so a loader of ``batch_size`` draws exactly these batches."""
    if batch_size < 1 or group_batches < 1:
        raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size}, {group_batches}")
    mega = batch_size * group_batches
    grouped: list[int] = []
    tail: list[int] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        if len(batches[-1]) < batch_size:
            tail = batches.pop()
        for b in torch.randperm(len(batches), generator=generator).tolist():
            grouped += batches[b]
    return grouped + tail


class _Skipped:
    """The batches of ``batches`` (a batch sampler) after the first ``skip``; index lists only, so
    skipping loads no data."""

    def __init__(self, batches: Iterable[list[int]], skip: int) -> None:
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator[list[int]]:
        return islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """A map-style ``DataLoader`` whose position in the epoch is part of the checkpoint.

    Lightning saves ``state_dict()`` of stateful training loaders with the fit loop and calls
    ``load_state_dict`` before iterating again, so a run resumed from a mid-epoch checkpoint
    continues with the batch the interrupted run would have trained next. The epoch's order comes
    from the sampler (``EpochSeededSampler``: ``set_epoch`` is Lightning's), so the state is only
    the number of batches handed out this epoch; on resume their indices are skipped in the batch
    sampler, before any worker loads data. ``persistent_workers`` is not supported (the workers
    would keep the old index stream).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.persistent_workers:
            raise ValueError("ResumableDataLoader does not support persistent_workers=True")
        self.batches_yielded = 0
        self._skip_next = 0
        self._skip_now = 0

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        if not self._skip_now:
            return sampler
        if not self._auto_collation:
            raise ValueError("ResumableDataLoader needs batched loading (batch_size or batch_sampler)")
        return _Skipped(sampler, self._skip_now)

    def __iter__(self) -> Iterator[Any]:
        self._skip_now, self._skip_next = self._skip_next, 0
        self.batches_yielded = self._skip_now
        try:
            iterator = super().__iter__()
        finally:
            self._skip_now = 0
        for batch in iterator:
            self.batches_yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(super()._index_sampler)

    def state_dict(self) -> dict[str, int]:
        """Batches handed out in the current epoch (0 once the epoch is complete)."""
        done = self.batches_yielded >= len(self)
        return {"batches_yielded": 0 if done else self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip_next = int(state["batches_yielded"])
        self.batches_yielded = self._skip_next
