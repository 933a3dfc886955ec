"""Loss functions and statistics for reward modelling and policy-gradient RLHF.

Pure tensor functions with no Lightning or model dependencies. Shape conventions:
``B`` batch, ``T`` response length, ``V`` vocabulary size. A ``mask`` is 0/1 (float or
int) or bool with the same shape as the tensor it masks, and marks valid response tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------- reward modelling


def pairwise_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley–Terry preference loss ``-log σ(r_c - r_r - margin)``, averaged over pairs.

    ``chosen_rewards``, ``rejected_rewards`` and the optional per-pair ``margin`` are (B,).
    ``center_coef > 0`` adds ``center_coef * mean((r_c + r_r)^2)``, which keeps rewards
    centred on zero (Eisenstein et al., 2023; TRL's ``center_rewards_coefficient``).
    Returns a scalar.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).mean()
    return loss


def classifier_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy on logits; ``logits`` (B,), ``labels`` (B,) with values 0/1. Scalar."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    Reduces all dims (scalar result) if ``dim`` is None, else only ``dim``.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked positions (scalar).

    With ``unbiased`` the Bessel correction ``n / (n - 1)`` is applied, where ``n`` is the
    number of masked positions (so ``n >= 2`` is needed for a finite result).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).pow(2), mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over masked positions.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Output has
    the shape of ``x`` and is 0 where ``mask`` is not set.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- policy optimisation


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over response tokens.

    ``rewards``, ``values`` and ``mask`` are (B, T); each row's mask is a contiguous run of
    valid tokens starting at position 0 (right padding). The episode ends after the last
    valid token, whose bootstrap value is 0. With ``δ_t = r_t + γ V_{t+1} - V_t``, the
    advantage is ``A_t = δ_t + γ λ A_{t+1}``. Returns ``(advantages, returns)``, both (B, T)
    with ``returns = advantages + values`` and zeros at padded positions.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cliprange: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss ``max(-A ρ, -A clip(ρ, 1-ε, 1+ε))`` with ``ρ = π / π_old`` (B, T), and
    where the clipped term is strictly larger (B, T) bool."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float = 0.2,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss ``max(-A ρ, -A clip(ρ, 1-ε, 1+ε))`` with ``ρ = π / π_old``.

    All inputs are (B, T). Returns scalars ``(loss, clipfrac, approx_kl)``: the masked-mean
    loss, the fraction of tokens where the clipped term is active (strictly larger) and
    the masked mean of ``0.5 (log π - log π_old)^2``.
    """
    per_token, was_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)
    loss = masked_mean(per_token, mask)
    clipfrac = masked_mean(was_clipped.to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs).pow(2), mask)
    return loss, clipfrac.detach(), approx_kl.detach()


Aggregation = Literal["grpo", "dr_grpo", "dapo"]


def aggregate(
    per_token: Tensor, mask: Tensor, aggregation: Aggregation, max_tokens: int | None = None
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar, as the GRPO variants do.

    ``grpo``: mean over each sequence's tokens, then over sequences (Shao et al., 2024; long
    responses weigh less per token). ``dr_grpo``: sum over tokens divided by ``B · max_tokens``,
    a constant (Liu et al., 2025; ``max_tokens`` defaults to ``T``). ``dapo``: mean over every
    token of the batch (Yu et al., 2025).
    """
    mask = mask.to(per_token.dtype)
    if aggregation == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_tokens or per_token.shape[-1]))
    if aggregation == "dapo":
        return masked_mean(per_token, mask)
    raise ValueError(f"aggregation must be 'grpo', 'dr_grpo' or 'dapo', got {aggregation!r}")


def group_advantages(rewards: Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: each reward minus the mean of its prompt's ``k`` samples, divided by their
    (unbiased) standard deviation + ``eps`` when ``scale`` (Dr. GRPO drops the division).

    ``rewards`` is (N,) prompt-major (prompt ``p``'s samples are rows ``p*k .. p*k+k-1``); (N,).
    """
    if k < 2:
        raise ValueError(f"group advantages need k >= 2 samples per prompt, got k={k}")
    if rewards.numel() % k != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not divisible by k={k}")
    grouped = rewards.view(-1, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view_as(rewards)


def reinforce_policy_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE loss ``-masked_mean(A · log π)`` with advantages treated as constants; (B, T) inputs."""
    return -masked_mean(advantages.detach() * logprobs, mask)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """Squared-error value loss ``0.5 (V - R)^2``, optionally clipped around ``old_values``.

    All inputs are (B, T). With ``cliprange_value`` set, the per-token loss is
    ``0.5 max((V - R)^2, (clip(V, V_old - ε, V_old + ε) - R)^2)``. Returns scalars
    ``(loss, clipfrac)``, clipfrac being the fraction of tokens where the clipped term is
    strictly larger (0 without clipping).
    """
    losses = (values - returns).pow(2)
    if cliprange_value is None:
        return 0.5 * masked_mean(losses, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped_losses = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(losses, clipped_losses), mask)
    clipfrac = masked_mean((clipped_losses > losses).to(values.dtype), mask)
    return loss, clipfrac.detach()


KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from tokens sampled from ``π``; shape-preserving.

    ``k1 = log π - log π_ref`` (unbiased, may be negative);
    ``k2 = ½ (log π - log π_ref)²`` (biased, non-negative, low variance);
    ``k3 = π_ref/π - 1 - log(π_ref/π)`` (unbiased and non-negative, Schulman 2020).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).pow(2)
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_loss(
    logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k2"
) -> Tensor:
    """Per-token KL term for the loss, whose expected gradient over tokens sampled from
    ``π_old`` is ``∇ KL(π ‖ π_ref)``; all inputs and the output are (B, T).

    Differentiating an estimator's value is not enough: ``∇ k1 = ∇ log π`` has expectation 0,
    and ``∇ k3`` is the gradient of ``KL(π_ref ‖ π)``. With ``ρ = π / π_old``:
    ``k1`` and ``k3`` are weighted by ``ρ`` (gradient flowing through ``ρ``), ``k2`` by ``sg(ρ)``
    (its own gradient, ``(log π − log π_ref) ∇ log π``, is already the score-function form).
    On-policy (``ρ = 1``) the values are the estimators' own.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    if estimator == "k2":
        ratio = ratio.detach()
    return ratio * kl_penalty(logprobs, ref_logprobs, estimator)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024).

    ``rewards`` is (N,) with ``N = P * k`` in prompt-major order (the k samples of prompt
    ``p`` are rows ``p*k .. p*k+k-1``). Returns (N,) with ``A_i = r_i - mean of the other
    k-1 rewards for the same prompt``.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    if rewards.numel() % k != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not divisible by k={k}")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view_as(rewards)


# --------------------------------------------------------------------------- logits utilities


LOGIT_CHUNK_ELEMENTS = 1 << 24
"""Rows of logits processed together in float32 by ``logprobs_from_logits`` and
``entropy_from_logits``: about this many elements (64 MiB of float32) at a time."""


def _row_slices(rows: int, vocab: int) -> Iterator[slice]:
    """Consecutive row slices of about ``LOGIT_CHUNK_ELEMENTS`` logits each, covering ``rows``."""
    step = max(1, LOGIT_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, start + step)


class _SelectedLogProbs(torch.autograd.Function):
    """``log softmax(logits / t)[label]`` without a float32 copy of the logits: the forward pass
    saves the logits as they are (bf16 under autocast) and one log-normaliser per row, and both
    passes work through the rows in float32 chunks."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _row_slices(*flat.shape):
            lse[rows] = torch.logsumexp(flat[rows].float() / temperature, dim=-1)
        picked = flat.gather(-1, flat_labels[:, None]).squeeze(-1).float() / temperature
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return (picked - lse).view(labels.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        t = ctx.temperature
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        g = grad.reshape(-1, 1).float()
        out = torch.empty_like(flat)
        for rows in _row_slices(*flat.shape):
            # d/dz of (z[label] - logsumexp(z)) with z = logits / t: onehot - softmax(z), times 1/t.
            d = torch.exp(flat[rows].float() / t - lse[rows, None]).mul_(-g[rows])
            d.scatter_add_(-1, flat_labels[rows, None], g[rows])
            out[rows] = d.div_(t)
        return out.view_as(logits), None, None


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``labels`` (B, T) under ``softmax(logits / temperature)`` with
    ``logits`` (B, T, V) of any float dtype; returns (B, T) float32.

    Computed as ``z[label] - logsumexp(z)`` in float32 chunks of rows, so neither the log-softmax
    over the vocabulary nor a float32 copy of the logits is ever materialised whole, and backward
    keeps only the logits themselves (e.g. bf16) and one float per row.
    """
    return _SelectedLogProbs.apply(logits, labels, float(temperature))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: (B, T, V) -> (B, T), in
    float32, a chunk of rows at a time. No gradient flows (it is a diagnostic)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for rows in _row_slices(*flat.shape):
        z = flat[rows].float() / temperature
        out[rows] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out.view(logits.shape[:-1])
