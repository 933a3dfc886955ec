"""What ``PPOModule`` expects from a rollout source: the batch type and the source protocol.

**Rollout batch** (``RolloutBatch``): one dict per training step, ``N`` rows (one sampled
response each, prompt-major when several samples share a prompt). ``PPOModule`` checks every
batch it receives (``check_rollout_batch``) and names the field that is missing or misshaped.

**Rollout source**: the training dataloader, an iterable of rollout batches that

1. *samples when asked*: each batch is generated (``module.generate``) and scored when the loop
   reaches it, never ahead of time, so it comes from the weights that will be updated with it;
2. *is sized*: ``len()`` gives the rollouts per epoch. Without a length, Lightning prefetches one
   batch to learn whether the epoch has ended, so the batch trained at step ``k`` would have been
   sampled at step ``k − 1``: off-policy, silently. ``PPOModule`` refuses such a source when
   training starts (``check_rollout_source``);
3. *runs in the main process*: ``num_workers=0`` (workers would sample ahead, and generation
   runs on the accelerator), ``batch_size=None`` (each item already is a batch).

``perlhf.RolloutDataset(make, length)`` is such a source: item ``i`` is ``make(i)``, called
only when the loop reaches it. ``perlhf.RolloutDataModule`` builds its rollouts that way.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from torch.utils.data import DataLoader, IterableDataset

try:
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired


class RolloutBatch(TypedDict):
    """One rollout: ``N`` sampled responses to prompts, with their scores.

    Padding sides matter: prompts are *left*-padded so that every response starts at column
    ``P`` (the policy's next-token prediction at position ``P − 1`` is the first response
    token's), responses are *right*-padded. Pad ids are ignored wherever the mask is 0.
    """

    prompt_ids: torch.Tensor
    """``(N, P)`` integer: policy token ids of the prompts, left-padded."""
    prompt_mask: torch.Tensor
    """``(N, P)`` 0/1: 0 on the left padding, 1 on the prompt; every row has a last-column 1."""
    response_ids: torch.Tensor
    """``(N, R)`` integer: sampled response ids, right-padded."""
    response_mask: torch.Tensor
    """``(N, R)`` 0/1: 1 up to and including the first EOS, then 0."""
    scores: torch.Tensor
    """``(N,)`` float: the reward of each response (after any shaping), the RL signal."""
    raw_scores: NotRequired[torch.Tensor]
    """``(N,)`` float: the reward before shaping (logged as ``val/reward``); default ``scores``."""
    ended_with_eos: NotRequired[torch.Tensor]
    """``(N,)`` bool: whether the response emitted EOS; default: from ``response_ids``."""
    samples_per_prompt: NotRequired[int]
    """``k`` rows share each prompt (rows ``p*k … p*k+k−1``); needed ≥ 2 by ``rloo``/``grpo``;
    default 1."""
    prompts: NotRequired[list[str]]
    """``N`` prompt texts, for the samples table; default: decoded ``prompt_ids``."""
    responses: NotRequired[list[str]]
    """``N`` response texts, for the samples table; default: decoded ``response_ids``."""
    stats: NotRequired[dict[str, float]]
    """Scalars logged under ``train/<name>`` (``RolloutDataModule``: reward components, timings)."""
    prompt_vision: NotRequired[list[dict[str, torch.Tensor] | None]]
    """Image prompts: per row, the image inputs ``generate`` got (``perlhf.data.images``)."""
    images: NotRequired[list[Any]]
    """Image prompts: per row, the PIL images (for gold scorers)."""


REQUIRED = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "scores")


def check_rollout_batch(batch: Any, tokenizer: Any = None, min_samples_per_prompt: int = 1) -> RolloutBatch:
    """``batch`` checked against ``RolloutBatch``, with the optional fields filled in (a new dict).

    Raises ``ValueError`` naming the first missing or misshaped field and what it should be.
    ``tokenizer`` (the policy's) decodes texts and finds EOS for fields that were left out;
    ``min_samples_per_prompt``: 2 for algorithms with group baselines.
    """
    if not isinstance(batch, dict):
        raise ValueError(
            f"a rollout batch must be a dict (perlhf.RolloutBatch), got {type(batch).__name__}; does "
            "the DataLoader batch it again? use batch_size=None"
        )
    missing = [name for name in REQUIRED if name not in batch]
    if missing:
        raise ValueError(
            f"rollout batch lacks field(s) {missing} (perlhf.RolloutBatch needs {list(REQUIRED)}); "
            f"it has {sorted(batch)}"
        )
    for name in REQUIRED:
        if not isinstance(batch[name], torch.Tensor):
            raise ValueError(
                f"rollout batch field {name!r} must be a torch.Tensor, got {type(batch[name]).__name__}"
            )
    n, p = _shape(batch, "prompt_ids", 2, integer=True)
    _, r = _shape(batch, "response_ids", 2, integer=True, rows=n)
    _shape(batch, "prompt_mask", 2, rows=n, columns=p)
    _shape(batch, "response_mask", 2, rows=n, columns=r)
    _shape(batch, "scores", 1, rows=n, floating=True)
    prompt_mask, response_mask = batch["prompt_mask"].long(), batch["response_mask"].long()
    if ((prompt_mask != 0) & (prompt_mask != 1)).any() or ((response_mask != 0) & (response_mask != 1)).any():
        raise ValueError("rollout batch masks 'prompt_mask' and 'response_mask' must hold only 0 and 1")
    if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any() or not prompt_mask[:, -1].all():
        raise ValueError(
            "rollout batch field 'prompt_mask' must be left-padded (zeros, then ones up to the last "
            "column): the response starts right after the prompt's last column; pad prompts on the left"
        )
    if (response_mask[:, 1:] > response_mask[:, :-1]).any():
        raise ValueError(
            "rollout batch field 'response_mask' must be right-padded (ones, then zeros): 1 up to and "
            "including the first EOS"
        )
    out: dict[str, Any] = dict(batch)
    out.setdefault("raw_scores", batch["scores"])
    _shape(out, "raw_scores", 1, rows=n, floating=True)
    if "ended_with_eos" not in out:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = batch["response_ids"]
        ended = (
            ((ids == eos) & (response_mask == 1)).any(-1) if eos is not None else torch.zeros_like(ids[:, 0])
        )
        out["ended_with_eos"] = ended.bool()
    _shape(out, "ended_with_eos", 1, rows=n)
    k = out.setdefault("samples_per_prompt", 1)
    if not isinstance(k, int) or k < min_samples_per_prompt or n % k:
        raise ValueError(
            f"rollout batch field 'samples_per_prompt' must be an int >= {min_samples_per_prompt} "
            f"dividing the {n} rows, got {k!r}"
            + (" (rloo and grpo compare the samples of each prompt)" if min_samples_per_prompt > 1 else "")
        )
    for name, ids in (("prompts", "prompt_ids"), ("responses", "response_ids")):
        if name not in out:
            if tokenizer is None:
                out[name] = [""] * n
            else:
                mask = prompt_mask if name == "prompts" else response_mask
                out[name] = [
                    tokenizer.decode(row[m.bool()], skip_special_tokens=True)
                    for row, m in zip(batch[ids].cpu(), mask.cpu(), strict=True)
                ]
        if len(out[name]) != n:
            raise ValueError(
                f"rollout batch field {name!r} must hold {n} texts (one per row), got {len(out[name])}"
            )
    for name in ("prompt_vision", "images"):
        if name in out and len(out[name]) != n:
            raise ValueError(
                f"rollout batch field {name!r} must hold {n} entries (one per row), got {len(out[name])}"
            )
    return out  # type: ignore[return-value]


def _shape(
    batch: dict[str, Any],
    name: str,
    ndim: int,
    rows: int | None = None,
    columns: int | None = None,
    integer: bool = False,
    floating: bool = False,
) -> tuple[int, ...]:
    """``batch[name].shape`` after checking its rank, sizes and dtype kind."""
    tensor = batch[name]
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"rollout batch field {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    want = "(N,)" if ndim == 1 else "(N, width)"
    shape = tuple(tensor.shape)
    if (
        len(shape) != ndim
        or (rows is not None and shape[0] != rows)
        or (columns is not None and shape[1] != columns)
    ):
        expected = [rows if rows is not None else "N", columns if columns is not None else "width"][:ndim]
        raise ValueError(
            f"rollout batch field {name!r} has shape {shape}; expected {want} = {tuple(expected)} "
            "(every field has one row per response, masks the width of their ids)"
        )
    if integer and tensor.is_floating_point():
        raise ValueError(
            f"rollout batch field {name!r} holds token ids: use an integer dtype, got {tensor.dtype}"
        )
    if floating and not tensor.is_floating_point():
        raise ValueError(f"rollout batch field {name!r} must be a float tensor, got {tensor.dtype}")
    return shape


def check_rollout_source(loader: Any) -> None:
    """Refuse a training rollout source that Lightning would read ahead of training (see the
    module docstring): one without a length, or a ``DataLoader`` with worker processes."""
    if isinstance(loader, DataLoader):
        if loader.num_workers > 0:
            raise ValueError(
                f"the rollout DataLoader has num_workers={loader.num_workers}: worker processes sample "
                "rollouts ahead of the update, from stale weights; use num_workers=0"
            )
        if not isinstance(loader.dataset, IterableDataset):
            return  # a map-style dataset is sized and built item by item
        dataset = loader.dataset
    else:
        dataset = loader
    try:
        len(dataset)
    except TypeError:
        raise ValueError(
            f"the rollout source ({type(dataset).__name__}) has no __len__: Lightning then prefetches one "
            "batch to detect the end of the epoch, so every rollout would be trained one step after it "
            "was sampled (off-policy). Give it a length (rollouts per epoch), e.g. "
            "perlhf.RolloutDataset(make_rollout, length)"
        ) from None
