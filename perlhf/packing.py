"""Prompt sharing: one packed sequence per preference pair, and per rollout prompt.

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

``pack_groups`` does the same for RL: the responses sampled for one prompt
(``samples_per_prompt > 1``) become one row ``prompt | response_1 | … | response_k``, so the
no-grad and update passes compute each prompt once, and responses carry no padding.
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
        (0 or the dtype's minimum) for eager attention (``segment_attention_mask``)."""
        return segment_attention_mask(self.segments, PAD, dtype)


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
    device = input_ids.device
    return PackedPairs(
        input_ids=right_pad_rows(rows, pad_token_id).to(device),
        position_ids=right_pad_rows(positions, 0).to(device),
        segments=right_pad_rows(segments, PAD).to(device),
        ends=torch.tensor(ends, dtype=torch.long, device=device),
        unshared_tokens=int(attention_mask.sum()),
    )


# ------------------------------------------------------------------------- rollout groups
GROUP_PAD = -1
"""Segment id of padding in packed rollout groups (0: the prompt, ``j + 1``: its ``j``-th response)."""


@dataclass
class PackedGroups:
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

    @property
    def tokens(self) -> int:
        """Real tokens of the packed rows."""
        return int((self.segments != GROUP_PAD).sum())

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(G, 1, L, L)`` block-causal mask (``segment_attention_mask``)."""
        return segment_attention_mask(self.segments, GROUP_PAD, dtype)

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
