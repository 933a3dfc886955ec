"""GRPO in PPOModule: group-normalised advantages, the loss aggregations wired through, KL in the
loss (and no reference pass at β = 0), and it learns the built-in task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from test_rl import RecordRewards, ppo_module, rollout_data
from test_rl_math import _junk_after_eos_batch, _record_steps, _run_training_step, _trained_policy

from perlhf import losses
from perlhf.modules.rl_config import KLSpec, PPOSpec

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0])


S1, S2 = 0.5 * 2**0.5, 2**0.5  # unbiased std of the groups (1, 2) and (3, 5)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("grpo", [-0.5 / (S1 + 1e-4), 0.5 / (S1 + 1e-4), -1 / (S2 + 1e-4), 1 / (S2 + 1e-4)]),
        ("dapo", [-0.5 / (S1 + 1e-4), 0.5 / (S1 + 1e-4), -1 / (S2 + 1e-4), 1 / (S2 + 1e-4)]),
        ("dr_grpo", [-0.5, 0.5, -1.0, 1.0]),  # centred only
    ],
)
def test_grpo_advantages_by_hand(tiny_model_dir: Path, aggregation: str, expected: list[float]) -> None:
    ppo = PPOSpec(loss_aggregation=aggregation)
    module = ppo_module(tiny_model_dir, "grpo", ppo=ppo, kl=KLSpec(coef=0.0, penalty="loss"))
    batch = {"scores": SCORES, "samples_per_prompt": 2}
    advantages, returns = module._advantages(batch, MASK, torch.zeros_like(MASK), None)
    torch.testing.assert_close(advantages, torch.tensor(expected)[:, None] * MASK)
    assert returns is None and module.value_mode is None


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_is_the_aggregated_surrogate_plus_kl(tiny_model_dir: Path, aggregation: str) -> None:
    """On-policy (ρ = 1): ``agg(-A) + β · agg(k2)``, both reduced by the same aggregation."""
    ppo = PPOSpec(epochs=1, minibatch_size=4, loss_aggregation=aggregation)
    module = _trained_policy(
        tiny_model_dir, "grpo", ppo=ppo, kl=KLSpec(coef=0.3, penalty="loss", estimator="k2")
    )
    batch = _junk_after_eos_batch(module)
    idx, mask = torch.arange(4), batch["response_mask"].float()
    with torch.no_grad():
        old = module._forward(batch, idx, with_values=False)["logprobs"]
        ref = module.reference_logprobs(batch, idx)
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])[:, None] * mask
    args = (batch, idx, 0, mask, old, ref, None, advantages, None)
    ((loss, stats),) = list(module._minibatch_losses(*args))
    expected = losses.aggregate(-advantages, mask, aggregation) + 0.3 * losses.aggregate(
        0.5 * (old - ref) ** 2, mask, aggregation
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert stats["clipfrac"] == 0.0


def test_grpo_needs_kl_in_the_loss(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="kl.penalty: loss"):
        ppo_module(tiny_model_dir, "grpo", kl=KLSpec(coef=0.1))


def test_beta_zero_runs_no_reference_pass(tiny_model_dir: Path) -> None:
    module = _trained_policy(
        tiny_model_dir, "grpo", ppo=PPOSpec(epochs=2, minibatch_size=2), kl=KLSpec(coef=0.0, penalty="loss")
    )

    def no_reference(*args, **kwargs):
        raise AssertionError("reference pass at β = 0")

    module.reference_logprobs = no_reference
    steps = _record_steps(module)
    module.on_train_batch_start(batch := _junk_after_eos_batch(module), 0)
    module.training_step(batch, 0)
    assert len(steps) == 4  # 2 epochs × 2 minibatches, each its own clipped-ratio step
    assert any(".lora_A.policy" in n for n in steps[0])


def test_grpo_seen_by_the_update(tiny_model_dir: Path) -> None:
    module = _trained_policy(tiny_model_dir, "grpo", kl=KLSpec(coef=0.1, penalty="loss", estimator="k3"))
    batch = _junk_after_eos_batch(module)
    seen = _run_training_step(module, batch)
    mask = batch["response_mask"].float()
    expected = losses.group_advantages(batch["scores"], 2)[:, None] * mask
    torch.testing.assert_close(seen["advantages"], expected)


def test_grpo_raises_reward(
    tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    ppo = PPOSpec(epochs=2, minibatch_size=32)
    module = ppo_module(tiny_model_dir, "grpo", ppo=ppo, kl=KLSpec(coef=0.0, penalty="loss"))
    record = RecordRewards()
    data = rollout_data(prompts_file, reward_export, "rloo")  # 16 prompts × 4 samples
    quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[record]).fit(
        module, datamodule=data
    )
    first, last = sum(record.rewards[:4]) / 4, sum(record.rewards[-4:]) / 4
    assert last > first + 0.5, f"grpo: mean reward {first:.2f} -> {last:.2f}"


def _one_step(module, reuse: bool) -> tuple[list[dict], list[float], int]:
    """One ``training_step`` on the junk-after-EOS batch: each optimiser step's gradients, the KL
    handed to the controller, and how many no-grad policy passes ran."""
    if not reuse:
        module._reuses_update_logprobs = lambda n: False
    steps = _record_steps(module)
    kls: list[float] = []
    module.kl_ctl.update = lambda kl, n: kls.append(kl)
    forward, no_grad_passes = module._forward, []

    def counted(*args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_passes.append(1)
        return forward(*args, **kwargs)

    module._forward = counted
    batch = _junk_after_eos_batch(module)
    module.on_train_batch_start(batch, 0)
    torch.manual_seed(1)
    module.training_step(batch, 0)
    return steps, kls, len(no_grad_passes)


@pytest.mark.parametrize(
    ("algorithm", "kl"),
    [
        ("grpo", KLSpec(coef=0.2, penalty="loss", estimator="k3")),
        ("rloo", KLSpec(coef=0.2, penalty="loss", estimator="k2")),
    ],
)
def test_on_policy_update_skips_the_rollout_pass_exactly(tiny_model_dir: Path, algorithm: str, kl) -> None:
    """One epoch whose two minibatches make one optimiser step, no critic, no KL in the reward:
    the no-grad policy pass is skipped, and the step's gradients and the KL reported equal those
    of the path that runs it."""
    ppo = PPOSpec(epochs=1, minibatch_size=2, gradient_accumulation=2)
    fast = _one_step(_trained_policy(tiny_model_dir, algorithm, ppo=ppo, kl=kl), reuse=True)
    full = _one_step(_trained_policy(tiny_model_dir, algorithm, ppo=ppo, kl=kl), reuse=False)
    assert (fast[2], full[2]) == (0, 2)
    assert len(fast[0]) == len(full[0]) == 1
    assert full[0][0].keys() == fast[0][0].keys()
    for name, grad in full[0][0].items():
        torch.testing.assert_close(fast[0][0][name], grad, rtol=1e-5, atol=1e-7)
    assert max(g.abs().max().item() for g in full[0][0].values()) > 1e-4
    assert fast[1] == pytest.approx(full[1], rel=1e-5) and full[1][0] > 0.01


@pytest.mark.parametrize(
    ("algorithm", "ppo", "kl", "reuses"),
    [
        (
            "grpo",
            PPOSpec(epochs=1, minibatch_size=2, gradient_accumulation=2),
            KLSpec(0.1, penalty="loss"),
            True,
        ),
        ("grpo", PPOSpec(epochs=1, minibatch_size=4), KLSpec(0.1, penalty="loss"), True),
        (
            "grpo",
            PPOSpec(epochs=2, minibatch_size=4),
            KLSpec(0.1, penalty="loss"),
            False,
        ),  # 2nd epoch is off-policy
        (
            "grpo",
            PPOSpec(epochs=1, minibatch_size=2),
            KLSpec(0.1, penalty="loss"),
            False,
        ),  # 2 optimiser steps
        (
            "rloo",
            PPOSpec(epochs=1, minibatch_size=4),
            KLSpec(0.1),
            False,
        ),  # KL in the reward needs them first
        ("rloo", PPOSpec(epochs=1, minibatch_size=4), KLSpec(0.0), True),
        ("reinforce", PPOSpec(epochs=1, minibatch_size=2), KLSpec(0.0), False),  # the critic's values
    ],
)
def test_when_the_rollout_pass_is_skipped(tiny_model_dir: Path, algorithm, ppo, kl, reuses: bool) -> None:
    module = ppo_module(tiny_model_dir, algorithm, ppo=ppo, kl=kl)
    assert module._reuses_update_logprobs(4) is reuses


@pytest.mark.parametrize(("share_prompt", "whole_groups"), [(True, True), (False, False)])
def test_update_minibatches_keep_a_prompts_samples_together(
    tiny_model_dir: Path, share_prompt: bool, whole_groups: bool
) -> None:
    """Packing prompts, the update shuffles whole groups (prompt-major rows ``p*k … p*k+k-1``), so
    a minibatch computes each prompt once for its k samples; unpacked, rows are shuffled."""
    module = ppo_module(tiny_model_dir, "grpo", share_prompt=share_prompt, kl=KLSpec(0.0, penalty="loss"))
    module.configure_model()
    torch.manual_seed(0)
    orders = [module._update_order(12, 3, torch.device("cpu")) for _ in range(20)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(12))
    grouped = [
        all(len({int(i) // 3 for i in order[j : j + 3]}) == 1 for j in range(0, 12, 3)) for order in orders
    ]
    assert all(grouped) if whole_groups else not any(grouped)
    assert len({tuple(o.tolist()) for o in orders}) > 10  # still random
