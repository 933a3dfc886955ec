"""PPOModule's RL quantities against values worked out by hand: where the score and the KL
penalty land, their signs, γ/λ per algorithm, whitening, the temperature of the log-probs, the
KL controller and gradient accumulation. Each test pins a property a one-line slip would break
(``tests/mutants`` applies such slips and checks that a test here fails)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_rl import ppo_module, rollout_batch
from transformers import AutoModelForCausalLM

from perlhf.losses import logprobs_from_logits
from perlhf.modules import PPOModule
from perlhf.modules.rl_config import KLController, KLSpec, PPOSpec

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
KL = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, -0.2, 0.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.25, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
SCORES = torch.tensor([2.0, -1.0])


def test_reinforce_advantages_by_hand(tiny_model_dir: Path) -> None:
    """γ = λ = 1 whatever ``ppo.gamma``/``ppo.lam`` say; the score lands on the last counted
    token (EOS); the KL penalty is subtracted: ``r_t = -β kl_t (+ score at EOS)``."""
    ppo = PPOSpec(epochs=1, gamma=0.9, lam=0.5, whiten_advantages=False)
    module = ppo_module(tiny_model_dir, "reinforce", ppo=ppo, kl=KLSpec(coef=0.5))
    advantages, returns = module._advantages({"scores": SCORES}, MASK, KL, VALUES)
    # row 0: r = [-0.05, -0.1, -0.15 + 2] -> returns-to-go [1.7, 1.75, 1.85]; minus values
    # row 1: r = [-0.2, 0.1 - 1]          -> returns-to-go [-1.1, -0.9]
    expected = torch.tensor([[1.2, 1.5, 0.85, 0.0], [-2.1, -2.9, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[1.7, 1.75, 1.85, 0.0], [-1.1, -0.9, 0.0, 0.0]]))


def test_ppo_advantages_use_gamma_and_lambda_by_hand(tiny_model_dir: Path) -> None:
    ppo = PPOSpec(gamma=0.5, lam=0.5, whiten_advantages=False)
    module = ppo_module(tiny_model_dir, "ppo", ppo=ppo, kl=KLSpec(coef=0.0))
    scores = torch.tensor([2.0])
    mask, values = torch.ones(1, 2), torch.tensor([[1.0, 1.0]])
    advantages, _ = module._advantages({"scores": scores}, mask, torch.zeros(1, 2), values)
    # δ_1 = 2 - 1 = 1; δ_0 = 0 + 0.5·1 - 1 = -0.5; A_0 = -0.5 + 0.25·1
    torch.testing.assert_close(advantages, torch.tensor([[-0.25, 1.0]]))


def test_whitened_advantages_have_zero_mean_and_unit_variance(tiny_model_dir: Path) -> None:
    module = ppo_module(tiny_model_dir, "reinforce", ppo=PPOSpec(epochs=1), kl=KLSpec(coef=0.5))
    advantages, _ = module._advantages({"scores": SCORES}, MASK, KL, VALUES)
    raw = torch.tensor([1.2, 1.5, 0.85, -2.1, -2.9])
    expected = (raw - raw.mean()) / raw.std()
    torch.testing.assert_close(advantages[MASK.bool()], expected, rtol=1e-5, atol=1e-5)


def test_adaptive_kl_controller_by_hand() -> None:
    controller = KLController(KLSpec(coef=0.1, adaptive=True, target=1.0, horizon=1000))
    controller.update(kl=1.1, n_samples=100)  # error +0.1: β·(1 + 0.1·0.1)
    assert controller.value == pytest.approx(0.101)
    controller.update(kl=0.0, n_samples=1000)  # error clipped to -0.2
    assert controller.value == pytest.approx(0.101 * 0.8)


def _trained_policy(tiny_model_dir: Path, algorithm: str, **kwargs) -> PPOModule:
    torch.manual_seed(0)
    module = ppo_module(tiny_model_dir, algorithm, **kwargs)
    module.configure_model()
    with torch.no_grad():  # a policy that differs from the reference
        for name, param in module.policy.named_parameters():
            if "lora_B.policy" in name:
                param.normal_(0, 0.3)
    return module


def _junk_after_eos_batch(module: PPOModule) -> dict:
    tok = module.tokenizer
    eos = tok.eos_token_id
    responses = [
        tok(" red")["input_ids"] + [eos, 7, 8, 9],
        tok(" blue green")["input_ids"] + [eos],
        tok(" cat")["input_ids"] + [eos, 5, 5],
        tok(" dog horse")["input_ids"] + [eos],
    ]
    prompts = ["Name some colours:"] * 2 + ["Name some animals:"] * 2
    batch = rollout_batch(module, responses, prompts)
    batch |= {
        "scores": torch.tensor([1.0, 3.0, -2.0, 0.5]),
        "ended_with_eos": torch.ones(4, dtype=torch.bool),
        "samples_per_prompt": 2,
        "prompts": prompts,
        "responses": ["r"] * 4,
    }
    return batch


def _run_training_step(module: PPOModule, batch: dict) -> dict:
    """One ``training_step`` without a Trainer; returns what reached the update and the KL
    controller."""
    seen: dict = {}

    def update(batch, mask, old_logprobs, ref_logprobs, old_values, advantages, returns, **kw) -> dict:
        seen.update(old=old_logprobs, ref=ref_logprobs, advantages=advantages)
        return {}

    module._update = update
    module.kl_ctl.update = lambda kl, n: seen.update(kl=kl)
    module.on_train_batch_start(batch, 0)
    module.training_step(batch, 0)
    return seen


def test_rloo_advantages_subtract_the_masked_kl_by_hand(tiny_model_dir: Path) -> None:
    """RLOO: ``A_i = (s_i - β KL_i) - (s_j - β KL_j)`` for the two samples of a prompt, with
    ``KL_i`` summed over the response up to EOS only."""
    ppo = PPOSpec(epochs=1, minibatch_size=4, whiten_advantages=False)
    module = _trained_policy(tiny_model_dir, "rloo", ppo=ppo, kl=KLSpec(coef=0.5))
    batch = _junk_after_eos_batch(module)
    seen = _run_training_step(module, batch)
    mask = batch["response_mask"].float()
    kl = ((seen["old"] - seen["ref"]) * mask).sum(-1)
    assert ((seen["old"] - seen["ref"]) * (1 - mask)).abs().sum() > 0.1  # junk would count
    rewards = batch["scores"] - 0.5 * kl
    other = rewards.view(2, 2).flip(-1).reshape(4)
    torch.testing.assert_close(seen["advantages"], (rewards - other)[:, None] * mask)


def test_kl_per_sequence_counts_tokens_up_to_eos(tiny_model_dir: Path) -> None:
    module = _trained_policy(tiny_model_dir, "ppo", kl=KLSpec(coef=0.5, adaptive=True))
    batch = _junk_after_eos_batch(module)
    seen = _run_training_step(module, batch)
    mask = batch["response_mask"].float()
    assert seen["kl"] == pytest.approx(((seen["old"] - seen["ref"]) * mask).sum(-1).mean().item())


def test_logprobs_use_the_sampling_temperature(tiny_model_dir: Path) -> None:
    module = _trained_policy(tiny_model_dir, "ppo")
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B.policy" in name:
                param.zero_()  # policy = reference = the base model
    module.sampling_temperature = 0.7
    tok = module.tokenizer
    response = tok(" red blue")["input_ids"]
    batch = rollout_batch(module, [response], ["Name some colours:"])
    idx = torch.arange(1)
    ids = torch.tensor([tok("Name some colours:")["input_ids"] + response])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        expected = logprobs_from_logits(logits[:, -len(response) - 1 : -1] / 0.7, torch.tensor([response]))
        policy = module._forward(batch, idx, with_values=False)["logprobs"]
        reference = module.reference_logprobs(batch, idx)
    torch.testing.assert_close(policy, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)


def _record_steps(module: PPOModule) -> list[dict[str, torch.Tensor]]:
    """Give ``module`` an optimiser that records the gradients of each step (no Trainer)."""
    recorded: list[dict[str, torch.Tensor]] = []

    class Recorder:
        def step(self) -> None:
            recorded.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})

        def zero_grad(self, set_to_none: bool = True) -> None:
            module.zero_grad(set_to_none=set_to_none)

    module.optimizers = lambda: Recorder()
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    return recorded


def test_gradient_accumulation_averages_minibatches(tiny_model_dir: Path) -> None:
    """Two minibatches of one accumulated into one step give the gradient of one minibatch of two
    (responses of equal length, so the token means agree)."""
    grads = []
    for minibatch, accumulation in ((2, 1), (1, 2)):
        ppo = PPOSpec(
            epochs=1,
            minibatch_size=minibatch,
            gradient_accumulation=accumulation,
            whiten_advantages=False,
            max_grad_norm=None,
        )
        module = _trained_policy(tiny_model_dir, "ppo", ppo=ppo)
        tok = module.tokenizer
        responses = [
            tok(" red")["input_ids"] + [tok.eos_token_id],
            tok(" cat")["input_ids"] + [tok.eos_token_id],
        ]
        batch = rollout_batch(module, responses, ["Name some colours:", "Name some animals:"])
        mask = batch["response_mask"].float()
        assert mask.all()
        idx = torch.arange(2)
        with torch.no_grad():
            old = module._forward(batch, idx, with_values=True)
        recorded = _record_steps(module)
        advantages = torch.tensor([[1.0, 1.0], [-2.0, -2.0]]) * mask
        module._update(batch, mask, old["logprobs"], old["logprobs"], old["values"], advantages, advantages)
        assert len(recorded) == 1
        grads.append(recorded[0])
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_every_mutant_still_applies() -> None:
    """Each slip in ``tests/mutants/run.py`` names a fragment that occurs exactly once in its file,
    and tests that exist, so the harness keeps testing the code as it is now."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("mutants_run", root / "mutants" / "run.py")
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # its dataclasses look their module up there
    spec.loader.exec_module(harness)
    for mutant in harness.MUTANTS:
        assert (root.parent / mutant.path).read_text().count(mutant.old) == 1, f"{mutant.name} is stale"
        for test in mutant.tests:
            file, name = test.split("::")
            assert f"def {name}(" in (root.parent / file).read_text(), f"{mutant.name}: no test {test}"
