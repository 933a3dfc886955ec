"""Prompt sharing: one packed sequence per preference prompt, and per rollout prompt.

A chosen and a rejected response to the same prompt share the prompt's tokens (often most of
them). ``pack_pairs`` writes each pair as one row ``prefix | chosen tail | rejected tail``, where
``prefix`` is the longest common token prefix of the two sequences, with

- position ids that restart for each tail at the prefix length, and
- an attention mask in which each tail sees the prefix and itself (causally) but not the other
  tails, so every token attends to exactly what it attends to in its own unshared sequence.

Pairs drawn from several answers to one prompt (InstructGPT's K answers make K(K-1)/2 pairs)
share a row, ``prefix | tail_1 | … | tail_K``, in which each distinct answer is computed once.
The rewards read at the tails' last tokens then equal the unshared path's (up to float
rounding), and so do the loss and its gradients, while the prefix is computed once: fewer FLOPs
and fewer stored activations. Attention runs through a
backbone that accepts 4D masks (``sdpa`` or ``eager``; not ``flash_attention_2``). Input rows
may be padded on either side; packed rows are padded on the right.

``pack_groups`` does the same for RL: the responses sampled for one prompt
(``samples_per_prompt > 1``) become one row ``prompt | response_1 | … | response_k``, so the
no-grad and update passes compute each prompt once, and responses carry no padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
"""Segment ids of a packed row: the shared prefix, then its tails (a single pair's chosen and
rejected tails are 1 and 2; a group's ``j``-th distinct sequence is ``j + 1``), then padding."""


class Packed:
    """What packed rows share: ``segments`` ``(G, L)``, the prefix 0, tails from 1, ``PAD``."""

    segments: torch.Tensor

    @property
    def tokens(self) -> int:
        """Real tokens of the packed rows."""
        return int((self.segments != PAD).sum())

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(G, 1, L, L)``: bool (True = attend) when ``dtype`` is None, else additive
        (0 or the dtype's minimum) for eager attention (``segment_attention_mask``)."""
        return segment_attention_mask(self.segments, PAD, dtype)


@dataclass
class PackedPairs(Packed):
    """``B`` preference pairs packed into ``G <= B`` rows of length ``L``: one row per prompt,
    ``prefix | tail_1 | … | tail_k | padding``, each distinct sequence's tail once."""

    input_ids: torch.Tensor
    """``(G, L)`` token ids: prefix, distinct sequences' tails, right padding."""
    position_ids: torch.Tensor
    """``(G, L)`` positions each token has in its unshared sequence (0 on padding)."""
    segments: torch.Tensor
    """``(G, L)`` ``PREFIX``, tail ``j + 1``, or ``PAD`` per token."""
    rows: torch.Tensor
    """``(2B,)`` packed row of each input row (chosen rows, then rejected rows)."""
    ends: torch.Tensor
    """``(2B,)`` column of each input row's last token in its packed row (its reward is read there)."""
    unshared_tokens: int
    """Real tokens of the unshared pairs (chosen + rejected lengths)."""


def segment_attention_mask(
    segments: torch.Tensor, pad: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(B, 1, L, L)`` block-causal mask of packed rows ``segments`` ``(B, L)``, where segment 0
    is the shared prefix: a query attends to earlier-or-same columns of the prefix or of its own
    segment; a padding query (segment ``pad``) attends to padding only (its output is never read).
    Bool (True = attend) when ``dtype`` is None, else additive (0 or the dtype's minimum)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    visible = (segments[:, None, :] == 0) & (segments[:, :, None] != pad)
    allowed = causal & (same | visible)
    if dtype is None:
        return allowed[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def right_pad_rows(values: list[list[int]], fill: int) -> torch.Tensor:
    """``(B, longest)`` long tensor of the rows ``values``, right-padded with ``fill``."""
    width = max(len(v) for v in values)
    return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int,
    prompt_lengths: torch.Tensor | None = None,
) -> PackedPairs:
    """Pack a pairwise batch (``(2B, L)``, rows ``[:B]`` chosen and ``[B:]`` rejected, padded on
    either side) into rows that compute each prompt, and each distinct sequence, once.

    Pairs go in one row when they share a sequence (the 4 answers to a prompt make 6 pairs out of
    4 sequences) or, given ``prompt_lengths`` ``(B,)`` (each pair's prompt tokens), the same
    prompt; other pairs get a row each. A row's prefix is the common token prefix of its
    sequences, stopped one token short of the shortest, so each tail keeps at least its last
    token, where its reward is read.
    """
    if input_ids.shape[0] % 2:
        raise ValueError(f"pack_pairs: a pairwise batch has an even number of rows, got {input_ids.shape[0]}")
    n_pairs = input_ids.shape[0] // 2
    sequences = [tuple(input_ids[i][attention_mask[i].bool()].tolist()) for i in range(2 * n_pairs)]
    distinct: dict[tuple[int, ...], int] = {}  # sequence -> its index among the distinct ones
    node = [distinct.setdefault(seq, len(distinct)) for seq in sequences]
    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prompts: dict[tuple[int, ...], int] = {}
    for i in range(n_pairs):
        links = [node[n_pairs + i]]
        if prompt_lengths is not None:
            prompt = sequences[i][: int(prompt_lengths[i])]
            links.append(node[prompts.setdefault(prompt, i)])
        for other in links:
            parent[find(other)] = find(node[i])
    members: dict[int, list[tuple[int, ...]]] = {}
    for seq, index in distinct.items():
        members.setdefault(find(index), []).append(seq)
    rows, positions, segments, where = [], [], [], {}
    for group in members.values():
        p = min(min(len(seq) for seq in group) - 1, *(common_prefix(group[0], seq) for seq in group))
        row, pos, seg = list(group[0][:p]), list(range(p)), [PREFIX] * p
        for j, seq in enumerate(group):
            row += seq[p:]
            pos += range(p, len(seq))
            seg += [j + 1] * (len(seq) - p)
            where[seq] = (len(rows), len(row) - 1)
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    device = input_ids.device
    located = torch.tensor([where[seq] for seq in sequences], dtype=torch.long, device=device)
    return PackedPairs(
        input_ids=right_pad_rows(rows, pad_token_id).to(device),
        position_ids=right_pad_rows(positions, 0).to(device),
        segments=right_pad_rows(segments, PAD).to(device),
        rows=located[:, 0],
        ends=located[:, 1],
        unshared_tokens=int(attention_mask.sum()),
    )


# ------------------------------------------------------------------------- rollout groups
GROUP_PAD = PAD
"""Segment id of padding in packed rollout groups (0: the prompt, ``j + 1``: its ``j``-th response)."""


@dataclass
class PackedGroups(Packed):
    """``n`` rollout rows packed into ``G`` rows, one per distinct prompt:
    ``prompt | response_1 | … | response_k | padding`` (each response without its padding)."""

    input_ids: torch.Tensor
    """``(G, L)`` token ids."""
    position_ids: torch.Tensor
    """``(G, L)`` positions each token has in its unshared sequence (0 on padding)."""
    segments: torch.Tensor
    """``(G, L)``: 0 prompt, ``j + 1`` the group's ``j``-th response, ``GROUP_PAD`` padding."""
    rows: torch.Tensor
    """``(n,)`` packed row of each input row."""
    predictors: torch.Tensor
    """``(n, R)`` column whose hidden state predicts each response token (for tokens past a
    response's end, its last column: their outputs are masked out)."""
    unshared_tokens: int
    """Columns the unshared rows compute (``n * (P + R)``, padding included)."""

    def hidden(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """Per input row, the hidden states ``(n, R, H)`` that predict its response tokens, from the
        packed rows' ``(G, L, H)``: what ``response_hidden`` gives for the unshared rows."""
        return last_hidden_state[self.rows[:, None], self.predictors]


def pack_groups(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int,
) -> PackedGroups:
    """Pack rollout rows (prompts ``(n, P)`` padded on either side, responses ``(n, R)``
    right-padded) so that each distinct prompt is computed once for all its responses.

    Rows with equal prompt tokens form a group wherever they are in the batch, so any minibatch of
    a rollout with ``samples_per_prompt > 1`` shares what it can; a group of one still drops its
    padding.
    """
    n, width_r = response_ids.shape
    groups: dict[tuple[int, ...], list[int]] = {}
    prompts = [prompt_ids[i][prompt_mask[i].bool()].tolist() for i in range(n)]
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    lengths = response_mask.long().sum(dim=1).tolist()
    ids, positions, segments = [], [], []
    row_of, predictors = [0] * n, [[0] * width_r for _ in range(n)]
    for g, (prompt, members) in enumerate(groups.items()):
        p = len(prompt)
        row, pos, seg = list(prompt), list(range(p)), [0] * p
        for j, i in enumerate(members):
            start, length = len(row), lengths[i]
            row += response_ids[i, :length].tolist()
            pos += range(p, p + length)
            seg += [j + 1] * length
            row_of[i] = g
            # token t is predicted by the column before it: the prompt's last for t = 0
            columns = [p - 1] + [start + t - 1 for t in range(1, length)]
            last = columns[-1] if columns else p - 1
            predictors[i] = (columns + [last] * width_r)[:width_r]
        ids.append(row)
        positions.append(pos)
        segments.append(seg)
    device = response_ids.device
    return PackedGroups(
        input_ids=right_pad_rows(ids, pad_token_id).to(device),
        position_ids=right_pad_rows(positions, 0).to(device),
        segments=right_pad_rows(segments, GROUP_PAD).to(device),
        rows=torch.tensor(row_of, dtype=torch.long, device=device),
        predictors=torch.tensor(predictors, dtype=torch.long, device=device),
        unshared_tokens=n * (prompt_ids.shape[1] + width_r),
    )
