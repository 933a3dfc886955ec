"""Prompt-prefix sharing for preference pairs: one packed sequence per pair.

A chosen and a rejected response to the same prompt share the prompt's tokens (often most of
them). ``pack_pairs`` writes each pair as one row ``prefix | chosen tail | rejected tail``, where
``prefix`` is the longest common token prefix of the two sequences, with

- position ids that restart for the rejected tail at the prefix length, and
- an attention mask in which each tail sees the prefix and itself (causally) but not the other
  tail, so every token attends to exactly what it attends to in its own unshared sequence.

The two rewards read at the tails' last tokens then equal the unshared path's (up to float
rounding), and so do the loss and its gradients, while the prefix is computed once: fewer FLOPs
and fewer stored activations. Attention runs through a
backbone that accepts 4D masks (``sdpa`` or ``eager``; not ``flash_attention_2``). Input rows
may be padded on either side; packed rows are padded on the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
"""Segment ids of a packed row."""


@dataclass
class PackedPairs:
    """``B`` preference pairs packed into ``B`` rows of length ``L``."""

    input_ids: torch.Tensor
    """``(B, L)`` token ids: prefix, chosen tail, rejected tail, right padding."""
    position_ids: torch.Tensor
    """``(B, L)`` positions each token has in its unshared sequence (0 on padding)."""
    segments: torch.Tensor
    """``(B, L)`` ``PREFIX``/``CHOSEN``/``REJECTED``/``PAD`` per token."""
    ends: torch.Tensor
    """``(B, 2)`` column of the chosen and of the rejected sequence's last token."""
    unshared_tokens: int
    """Real tokens of the unshared pairs (chosen + rejected lengths)."""

    @property
    def tokens(self) -> int:
        """Real tokens of the packed rows."""
        return int((self.segments != PAD).sum())

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, 1, L, L)``: bool (True = attend) when ``dtype`` is None, else additive
        (0 or the dtype's minimum) for eager attention. A query attends to earlier-or-same
        columns of the prefix or of its own segment; a padding query attends to padding only (its
        output is never read)."""
        seg = self.segments
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        same = seg[:, :, None] == seg[:, None, :]
        visible = (seg[:, None, :] == PREFIX) & (seg[:, :, None] != PAD)
        allowed = causal & (same | visible)
        if dtype is None:
            return allowed[:, None]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> PackedPairs:
    """Pack a pairwise batch (``(2B, L)``, rows ``[:B]`` chosen and ``[B:]`` rejected, padded on
    either side)
    into ``B`` rows that compute each pair's common prefix once.

    The shared prefix stops one token short of the shorter sequence's end, so each tail keeps at
    least its last token, where its reward is read.
    """
    if input_ids.shape[0] % 2:
        raise ValueError(f"pack_pairs: a pairwise batch has an even number of rows, got {input_ids.shape[0]}")
    n_pairs = input_ids.shape[0] // 2
    rows, positions, segments, ends = [], [], [], []
    for i in range(n_pairs):
        chosen = input_ids[i][attention_mask[i].bool()].tolist()  # real tokens, either padding side
        rejected = input_ids[n_pairs + i][attention_mask[n_pairs + i].bool()].tolist()
        p = min(common_prefix(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
        rows.append(chosen + rejected[p:])
        positions.append(list(range(len(chosen))) + list(range(p, len(rejected))))
        segments.append([PREFIX] * p + [CHOSEN] * (len(chosen) - p) + [REJECTED] * (len(rejected) - p))
        ends.append([len(chosen) - 1, len(rows[-1]) - 1])
    width = max(len(r) for r in rows)

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    device = input_ids.device
    return PackedPairs(
        input_ids=pad(rows, pad_token_id).to(device),
        position_ids=pad(positions, 0).to(device),
        segments=pad(segments, PAD).to(device),
        ends=torch.tensor(ends, dtype=torch.long, device=device),
        unshared_tokens=int(attention_mask.sum()),
    )
