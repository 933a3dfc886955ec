"""Tests for perlhf.losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from perlhf.losses import (
    aggregate,
    classifier_loss,
    clipped_surrogate,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_loss,
    ppo_policy_loss,
    reinforce_policy_loss,
    rloo_advantages,
    value_loss,
)


def t(data) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# --------------------------------------------------------------------------- reward modelling


def neg_logsigmoid(x: float) -> float:
    return math.log(1.0 + math.exp(-x))


def test_pairwise_loss_plain_margin_and_center():
    chosen, rejected = t([1.0, 0.0]), t([0.0, 0.5])
    # differences 1.0 and -0.5
    close(pairwise_loss(chosen, rejected), (neg_logsigmoid(1.0) + neg_logsigmoid(-0.5)) / 2)
    # margin [0.5, 0.0] -> differences 0.5 and -0.5
    margin = t([0.5, 0.0])
    bt = (neg_logsigmoid(0.5) + neg_logsigmoid(-0.5)) / 2
    close(pairwise_loss(chosen, rejected, margin=margin), bt)
    # centre term: 0.1 * ((1 + 0)^2 + (0 + 0.5)^2) / 2 = 0.0625
    close(pairwise_loss(chosen, rejected, margin=margin, center_coef=0.1), bt + 0.0625)


def test_pairwise_loss_is_numerically_stable():
    loss = pairwise_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    close(loss, 2000.0, atol=1e-3)
    close(pairwise_loss(torch.tensor([1000.0]), torch.tensor([-1000.0])), 0.0)


def test_classifier_loss_matches_manual_bce():
    logits, labels = t([2.0, -1.0, 0.0]), t([1.0, 0.0, 1.0])
    # label 1: -log σ(x) = log(1 + e^-x); label 0: -log(1 - σ(x)) = log(1 + e^x)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 3
    close(classifier_loss(logits, labels), expected)
    close(classifier_loss(logits, labels.long()), expected)


# --------------------------------------------------------------------------- masked statistics

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1, 1, 0], [1, 0, 1]]  # selects 1, 2, 4, 6: mean 3.25, sum of squared deviations 14.75


@pytest.mark.parametrize("mask", [t(MASK), torch.tensor(MASK, dtype=torch.bool)])
def test_masked_mean(mask):
    close(masked_mean(t(X), mask), 13 / 4)
    close(masked_mean(t(X), mask, dim=1), [1.5, 5.0])
    close(masked_mean(t(X), mask, dim=0), [2.5, 2.0, 6.0])


def test_masked_var():
    close(masked_var(t(X), t(MASK)), 14.75 / 3)
    close(masked_var(t(X), t(MASK), unbiased=False), 14.75 / 4)


def test_masked_whiten():
    x, mask = t(X), t(MASK)
    std = math.sqrt(14.75 / 3 + 1e-8)
    expected = [[(1 - 3.25) / std, (2 - 3.25) / std, 0.0], [(4 - 3.25) / std, 0.0, (6 - 3.25) / std]]
    out = masked_whiten(x, mask)
    close(out, expected)
    close(masked_mean(out, mask), 0.0)
    close(masked_var(out, mask), 1.0, atol=1e-6)

    unshifted = masked_whiten(x, mask.bool(), shift_mean=False)
    close(unshifted, (out + 3.25) * mask)
    close(masked_mean(unshifted, mask), 3.25)
    assert (unshifted[mask == 0] == 0).all()


# --------------------------------------------------------------------------- GAE


def test_gae_single_row_by_hand():
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.2]]), t([[1, 1, 1]])
    # deltas: d0 = 0 + 0.9*0.4 - 0.5 = -0.14, d1 = 0 + 0.9*0.2 - 0.4 = -0.22, d2 = 1 + 0 - 0.2 = 0.8
    # gamma*lam = 0.72: A2 = 0.8, A1 = -0.22 + 0.72*0.8 = 0.356, A0 = -0.14 + 0.72*0.356 = 0.11632
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.11632, 0.356, 0.8]])
    close(returns, [[0.61632, 0.756, 1.0]])


def test_gae_rows_of_different_lengths_do_not_leak_padding():
    rewards = t([[0.0, 1.0, 99.0], [0.0, 0.0, 1.0]])
    values = t([[0.5, 0.4, 77.0], [0.5, 0.4, 0.2]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # row 0 ends after t=1: d1 = 1 - 0.4 = 0.6, d0 = 0.9*0.4 - 0.5 = -0.14
    # A1 = 0.6, A0 = -0.14 + 0.72*0.6 = 0.292; row 1 is the single-row example
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.292, 0.6, 0.0], [0.11632, 0.356, 0.8]])
    close(returns, [[0.792, 1.0, 0.0], [0.61632, 0.756, 1.0]])

    alone_adv, alone_ret = gae(rewards[:1, :2], values[:1, :2], mask[:1, :2], gamma=0.9, lam=0.8)
    close(advantages[:1, :2], alone_adv)
    close(returns[:1, :2], alone_ret)


def test_gae_defaults_gamma_one():
    # gamma=1, lam=0.95: d1 = 2 - 1 = 1, d0 = 0 + 1 - 0 = 1; A1 = 1, A0 = 1 + 0.95 = 1.95
    advantages, returns = gae(t([[0.0, 2.0]]), t([[0.0, 1.0]]), torch.tensor([[True, True]]))
    close(advantages, [[1.95, 1.0]])
    close(returns, [[1.95, 2.0]])


# --------------------------------------------------------------------------- policy losses


def test_ppo_policy_loss_clipping():
    # token: (advantage, ratio) -> per-token loss, clipped branch active?
    # (+1, 1.1): -1.1 vs -1.1 -> -1.1, no   | (+1, 1.5): -1.5 vs -1.2 -> -1.2, yes
    # (-1, 0.5):  0.5 vs  0.8 ->  0.8, yes  | (-1, 1.5):  1.5 vs  1.2 ->  1.5, no
    # (+1, 0.5): -0.5 vs -0.8 -> -0.5, no   | last token is padding
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 3.0]
    advantages = t([[1.0, 1.0, -1.0, -1.0, 1.0, 100.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    old = t([[-1.0] * 6])
    logprobs = (old + t([[math.log(r) for r in ratios]])).requires_grad_()

    loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    close(loss, (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5)
    close(clipfrac, 2 / 5)
    close(approx_kl, sum(0.5 * math.log(r) ** 2 for r in ratios[:5]) / 5)

    # d loss / d logprob = -A * ratio / 5 on unclipped tokens, 0 on clipped or padded ones
    loss.backward()
    close(logprobs.grad, [[-1.1 / 5, 0.0, 0.0, 1.5 / 5, -0.5 / 5, 0.0]])


def test_reinforce_policy_loss():
    logprobs = t([[-1.0, -2.0, -3.0]]).requires_grad_()
    advantages = t([[2.0, 1.0, 5.0]]).requires_grad_()
    # -(2*-1 + 1*-2) / 2 = 2
    loss = reinforce_policy_loss(logprobs, advantages, t([[1, 1, 0]]))
    close(loss, 2.0)
    loss.backward()
    close(logprobs.grad, [[-1.0, -0.5, 0.0]])
    assert advantages.grad is None


def test_value_loss_clipped_and_unclipped():
    values = t([[1.0, 1.5, 1.5, 9.0]])
    old_values = t([[0.9, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 2.0, 1.0, -9.0]])
    mask = t([[1, 1, 1, 0]])
    # clipped values: 1.0, 1.2, 1.2
    # squared errors: (1, 1) -> 1 | (0.25, 0.64) -> 0.64 clipped | (0.25, 0.04) -> 0.25
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * (1.0 + 0.64 + 0.25) / 3)
    close(clipfrac, 1 / 3)

    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=None)
    close(loss, 0.5 * (1.0 + 0.25 + 0.25) / 3)
    close(clipfrac, 0.0)


# --------------------------------------------------------------------------- KL and RLOO


def test_kl_penalty_estimators():
    logprobs, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    close(kl_penalty(logprobs, ref), [[0.5, -1.0]])
    # k3 with d = ref - logprobs = [-0.5, 1.0]: e^d - 1 - d
    close(kl_penalty(logprobs, ref, "k3"), [[math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]])

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=gen) * 3, torch.randn(4, 16, generator=gen) * 3
    k3 = kl_penalty(a, b, "k3")
    assert k3.shape == a.shape
    assert (k3 >= 0).all()
    close(kl_penalty(a, a, "k3"), torch.zeros_like(a))


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator.*k1.*k2.*k3"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


def test_kl_loss_values_on_policy_by_hand():
    # log π = -1, log π_ref = -2, on-policy (ρ = 1): k1 = 1, k2 = 0.5, k3 = e^-1 - 1 + 1
    logprobs, ref = t([[-1.0]]), t([[-2.0]])
    close(kl_loss(logprobs, logprobs, ref, "k1"), [[1.0]])
    close(kl_loss(logprobs, logprobs, ref, "k2"), [[0.5]])
    close(kl_loss(logprobs, logprobs, ref, "k3"), [[math.exp(-1.0)]])
    # off-policy by log ρ = 0.5: k1 and k3 scale by ρ = e^0.5, and so does k2's value
    close(kl_loss(logprobs, logprobs - 0.5, ref, "k1"), [[math.exp(0.5)]])
    close(kl_loss(logprobs, logprobs - 0.5, ref, "k2"), [[0.5 * math.exp(0.5)]])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_kl_loss_expected_gradient_is_the_kl_gradient(estimator, off_policy):
    """Σ_y π_old(y) ∇ kl_loss(y) = ∇ KL(π ‖ π_ref), exactly, over a 4-token vocabulary."""
    theta = t([0.3, -0.2, 1.0, 0.1]).requires_grad_()
    ref = torch.log_softmax(t([0.0, 0.5, -0.5, 0.2]), -1)
    logprobs = torch.log_softmax(theta, -1)
    old = torch.log_softmax(t([0.1, 0.1, 0.6, -0.3]), -1) if off_policy else logprobs.detach()
    (exact,) = torch.autograd.grad((logprobs.exp() * (logprobs - ref)).sum(), theta, retain_graph=True)
    surrogate = (old.exp() * kl_loss(logprobs, old, ref, estimator)).sum()
    (estimated,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    close(estimated, exact, atol=1e-12)
    # the naive loss ∇ k1 has expected gradient 0, not the KL gradient
    (naive,) = torch.autograd.grad((logprobs.detach().exp() * (logprobs - ref)).sum(), theta)
    close(naive, torch.zeros(4), atol=1e-12)


def test_rloo_advantages():
    rewards = t([1.0, 2.0, 3.0, 10.0, 0.0, 5.0])
    # prompt 0: 1 - 2.5, 2 - 2, 3 - 1.5; prompt 1: 10 - 2.5, 0 - 7.5, 5 - 5
    close(rloo_advantages(rewards, k=3), [-1.5, 0.0, 1.5, 7.5, -7.5, 0.0])
    # k=2: each advantage is the difference to the other sample
    close(rloo_advantages(rewards[:4], k=2), [-1.0, 1.0, -7.0, 7.0])


def test_rloo_advantages_validates_k():
    with pytest.raises(ValueError, match="k"):
        rloo_advantages(t([1.0, 2.0]), k=1)
    with pytest.raises(ValueError, match="5.*k=3"):
        rloo_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0]), k=3)


# --------------------------------------------------------------------------- logits utilities


def test_logprobs_from_logits_by_hand_and_against_log_softmax():
    # softmax(log [1, 2, 3]) = [1/6, 2/6, 3/6]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    close(logprobs_from_logits(logits, torch.tensor([[2, 0]])), [[math.log(0.5), math.log(1 / 6)]], atol=1e-6)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen) * 5
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    expected = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected, atol=1e-5)

    out = logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.shape == (2, 3)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_chunked_values_and_gradients_match_autograd(monkeypatch, chunk_rows, dtype):
    """Chunks of 1 and 4 rows (of 12) and one chunk give the plain log-softmax's values and
    gradients, at temperature 0.7, for float32 and bf16 logits (whose gradient stays bf16)."""
    import perlhf.losses as losses_module

    monkeypatch.setattr(losses_module, "LOGIT_CHUNK_ELEMENTS", chunk_rows * 11)
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(3, 4, 11, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    weights = torch.randn(3, 4, generator=gen)

    ours = base.clone().requires_grad_(True)
    out = logprobs_from_logits(ours, labels, temperature=0.7)
    (out * weights).sum().backward()

    ref = base.float().clone().requires_grad_(True)
    expected = (ref / 0.7).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()

    assert out.dtype == torch.float32 and ours.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    close(out, expected.detach(), atol=1e-5)  # the bf16 values are exact in float32
    close(ours.grad.float(), ref.grad, atol=tol)
    # each row's gradient sums to 0 (softmax's) and peaks at the label: a sign error would flip it
    close(ref.grad.sum(-1), torch.zeros(3, 4), atol=1e-5)
    picked = ours.grad.float().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.all(torch.sign(picked) == torch.sign(weights))


def test_logprobs_from_logits_keeps_no_float32_copy_for_backward():
    """Backward keeps the bf16 logits themselves, the labels and one float per row: no float32
    (B, T, V) tensor, which is what made the RL update's peak grow with the vocabulary."""
    logits = torch.randn(2, 5, 1000).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 1000, (2, 5))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_from_logits(logits, labels, temperature=0.7).sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved) <= logits.numel() * 2 + 10 * (8 + 4)
    assert not any(t.dtype == torch.float32 and t.numel() >= 1000 for t in saved)


def test_entropy_from_logits_chunked_with_temperature(monkeypatch):
    import perlhf.losses as losses_module

    monkeypatch.setattr(losses_module, "LOGIT_CHUNK_ELEMENTS", 2 * 7)
    logits = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(2)) * 3
    probs = (logits / 0.5).softmax(-1)
    close(entropy_from_logits(logits, temperature=0.5), -(probs * probs.log()).sum(-1), atol=1e-5)


def test_entropy_from_logits():
    # uniform over V=5 -> log 5
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)), atol=1e-6)
    # probabilities [1/6, 2/6, 3/6]
    probs = [1 / 6, 2 / 6, 3 / 6]
    expected = -sum(p * math.log(p) for p in probs)
    close(entropy_from_logits(torch.log(torch.tensor([[probs]]))), [[expected]], atol=1e-6)
    # nearly one-hot -> ~0; bf16 input comes back as float32
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    out = entropy_from_logits(peaked)
    assert out.dtype == torch.float32
    close(out, [[0.0]], atol=1e-6)


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand():
    rewards = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 0: mean 2, unbiased std 1; group 1: mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    s = math.sqrt(12.0)
    close(group_advantages(rewards, k=3, eps=0.0), [-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s])
    close(group_advantages(rewards, k=3, scale=False), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    close(group_advantages(t([5.0, 5.0]), k=2), [0.0, 0.0])  # equal rewards: no signal, no NaN
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(rewards, k=1)


def test_loss_aggregations_by_hand():
    per_token = t([[1.0, 2.0, 3.0, 7.0], [4.0, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(aggregate(per_token, mask, "grpo"), (6 / 3 + 4 / 1) / 2)  # per-sequence means
    close(aggregate(per_token, mask, "dr_grpo"), (6 + 4) / (2 * 4))  # constant normaliser
    close(aggregate(per_token, mask, "dr_grpo", max_tokens=10), (6 + 4) / (2 * 10))
    close(aggregate(per_token, mask, "dapo"), (6 + 4) / 4)  # token mean over the batch
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "mean")


def test_clipped_surrogate_matches_ppo_loss():
    logprobs, old = t([[-1.0, -0.5]]), t([[-1.2, -1.5]])
    per_token, clipped = clipped_surrogate(logprobs, old, t([[1.0, 1.0]]), cliprange=0.2)
    # ratios e^0.2 = 1.221 (clipped to 1.2) and e^1 (clipped): -min(ρ, 1.2)
    close(per_token, [[-1.2, -1.2]])
    assert clipped.tolist() == [[True, True]]
