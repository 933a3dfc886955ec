"""PPOModule gradients and sampling are the ones the maths asks for: checkpointing recomputes
under the adapter that ran the forward, sampling follows the optimised policy, clipping sees
unscaled gradients, REINFORCE stays on-policy, the critic starts at the reward scale and owns
only its adapter's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from test_rl import ppo_module, rollout_batch, rollout_data
from torch import nn

from perlhf.losses import masked_mean
from perlhf.models import LoraSpec, ModelConfig, checkpointing_in_eval
from perlhf.modules import PPOModule
from perlhf.modules.policy import hf_model
from perlhf.modules.rl_config import KLSpec, PPOSpec


def _colour_batch(module: PPOModule) -> dict:
    tok = module.tokenizer
    responses = [tok(" red blue red")["input_ids"] + [tok.eos_token_id], tok(" cat dog horse")["input_ids"]]
    return rollout_batch(module, responses, ["Name some colours:", "Name some animals, please:"])


def _gradients(module: PPOModule, batch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of one minibatch's losses (policy + KL + value) at fixed random advantages."""
    idx, mask = torch.arange(2), batch["response_mask"].float()
    with torch.no_grad():
        old = module._forward(batch, idx, with_values=True)
        ref = module.reference_logprobs(batch, idx)
    gen = torch.Generator().manual_seed(seed)
    advantages = torch.randn(mask.shape, generator=gen) * mask
    returns = torch.randn(mask.shape, generator=gen) * mask
    module.zero_grad(set_to_none=True)
    with checkpointing_in_eval(module):
        args = (batch, idx, 0, mask, old["logprobs"], ref, old["values"], advantages, returns)
        for loss, _ in module._minibatch_losses(*args):
            loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("split", [True, False])
def test_checkpointing_recomputes_under_the_value_adapter(tiny_model_dir: Path, split: bool) -> None:
    """Same weights, same minibatch: checkpointing on or off gives the same gradients, value
    adapter included (the backward pass recomputes its blocks after the forward's context exited)."""
    modules = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = ModelConfig(
            name_or_path=str(tiny_model_dir),
            lora=LoraSpec(r=8, alpha=16, dropout=0.0),
            gradient_checkpointing=checkpointing,
        )
        module = PPOModule(config, algorithm="ppo", kl=KLSpec(penalty="loss", estimator="k2"))
        module.configure_model()
        module._split_backward = lambda split=split: split
        modules.append(module)
    plain, checkpointed = modules
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if "lora_B" in name or "value_head" in name:
                param.normal_(0, 0.1)
        checkpointed.load_state_dict(plain.state_dict())
    batch = _colour_batch(plain)
    expected, actual = _gradients(plain, batch), _gradients(checkpointed, batch)
    assert set(expected) == set(actual) and any(".lora_A.value" in n for n in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_sampling_ignores_the_checkpoints_generation_config(tiny_model_dir: Path) -> None:
    """Training log-probs are plain ``softmax(logits / T)``; a repetition penalty or n-gram ban
    left in the checkpoint's ``generation_config`` must not reach the sampler."""
    torch.manual_seed(0)
    module = ppo_module(tiny_model_dir)
    module.configure_model()
    config = hf_model(module.policy).generation_config
    config.no_repeat_ngram_size, config.repetition_penalty = 1, 50.0
    tok = module.tokenizer
    ids = torch.tensor([tok("Name some colours:")["input_ids"]] * 64)
    out = module.generate(ids, torch.ones_like(ids), max_new_tokens=12, do_sample=True, temperature=1.0)
    eos = tok.eos_token_id
    words = [row.tolist()[: row.tolist().index(eos)] if eos in row else row.tolist() for row in out]
    repeated = sum(len(set(w)) < len(w) for w in words)
    assert repeated > 8, f"only {repeated}/64 responses repeat a token: the sampler is not the policy"
    assert config.no_repeat_ngram_size == 1  # the checkpoint's own config is left as it was


def test_reinforce_takes_one_optimiser_step_per_rollout(
    tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """64 samples in minibatches of 16: the REINFORCE gradient is accumulated into one step
    (a second step would use samples of a policy that no longer exists, with no ratio)."""
    module = ppo_module(tiny_model_dir, "reinforce", ppo=PPOSpec(epochs=1, minibatch_size=16))
    data = rollout_data(prompts_file, reward_export, rollouts_per_epoch=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="reinforce.*epochs"):
        ppo_module(tiny_model_dir, "reinforce", ppo=PPOSpec(epochs=2))


def test_the_critic_starts_at_the_reward_scale(tiny_model_dir: Path) -> None:
    """Rewards near -2.7 with value clipping at ±0.2: the first rollout's values must start near
    the returns, not at 0 (where the clipped value loss would let the critic crawl)."""
    module = ppo_module(tiny_model_dir, "ppo")
    module.configure_model()
    batch = _colour_batch(module)
    batch["scores"] = torch.tensor([-2.6, -2.8])
    mask = batch["response_mask"].float()
    module.initialize_value_head(batch["scores"])
    values = module._forward(batch, torch.arange(2), with_values=True)["values"]
    assert masked_mean(values, mask).item() == pytest.approx(-2.7, abs=1e-5)
    module.initialize_value_head(torch.tensor([5.0, 5.0]))  # only the first rollout sets it
    assert module.value_head.bias.item() == pytest.approx(-2.7, abs=1e-5)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the global gradient norm it steps with."""

    norms: list[float] = []

    def step(self, closure=None):  # noqa: ANN001, ANN201
        if closure is not None:  # Lightning's closure runs on_before_optimizer_step (clipping)
            with torch.enable_grad():
                closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return super().step()


@pytest.mark.parametrize("fp16", [False, True])
def test_gradients_are_clipped_after_unscaling(
    fp16: bool, tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """Under 16-mixed the loss scale (1024 here) must not enter clipping: the optimiser steps with
    a gradient of norm ``max_grad_norm``, not ``max_grad_norm / scale``."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    RecordingSGD.norms = []
    module = PPOModule(
        ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0)),
        algorithm="ppo",
        ppo=PPOSpec(epochs=1, minibatch_size=64, max_grad_norm=1e-3),
        optimizer=lambda p: RecordingSGD(p, lr=1e-3),
    )
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))]
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, plugins=plugins if fp16 else None)
    trainer.fit(module, datamodule=rollout_data(prompts_file, reward_export, rollouts_per_epoch=1))
    assert RecordingSGD.norms == [pytest.approx(1e-3, rel=1e-3)]


def test_value_adapter_owns_only_its_own_tensors(tiny_model_dir: Path, monkeypatch) -> None:
    """A backbone module named ``value`` (BERT-style attention) stays frozen: the critic trains
    the ``value`` adapter's LoRA tensors, selected from the adapter layers themselves."""
    import perlhf.modules.rl as rl

    build = rl.build_causal_lm

    def build_with_value_module(cfg: ModelConfig, adapter_name: str) -> nn.Module:
        policy = build(cfg, adapter_name=adapter_name)
        hf_model(policy).transformer.h[0].value = nn.Linear(4, 4).requires_grad_(False)
        return policy

    monkeypatch.setattr(rl, "build_causal_lm", build_with_value_module)
    module = ppo_module(tiny_model_dir)
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(".h.0.value." in n for n in trainable)
    value_lora = {n for n in trainable if ".lora_A.value." in n or ".lora_B.value." in n}
    policy_lora = {n for n in trainable if ".lora_A.policy." in n or ".lora_B.policy." in n}
    assert len(value_lora) == len(policy_lora) > 0
    assert trainable == value_lora | policy_lora | {"value_head.weight", "value_head.bias"}


def test_a_trained_starting_adapter_is_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Starting from an SFT LoRA (not merged): the policy begins as that adapter, the reference
    is a frozen copy of it (KL 0 at the start), not the bare backbone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from perlhf.losses import logprobs_from_logits
    from perlhf.models import build_causal_lm

    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    sft = build_causal_lm(config)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    sft.save_pretrained(tmp_path / "sft")
    module = PPOModule(config, policy_adapter=str(tmp_path / "sft"))
    module.configure_model()
    batch = _colour_batch(module)
    idx, mask = torch.arange(2), batch["response_mask"].bool()
    with torch.no_grad():
        policy = module._forward(batch, idx, with_values=False)["logprobs"]
        reference = module.reference_logprobs(batch, idx)
    torch.testing.assert_close(policy[mask], reference[mask], rtol=0, atol=1e-6)
    ids = module.tokenizer("Name some colours:")["input_ids"]
    response = batch["response_ids"][0][mask[0]].tolist()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sft"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        full = torch.tensor([ids + response])
        expected = logprobs_from_logits(
            reloaded(full).logits[:, len(ids) - 1 : -1], torch.tensor([response])
        )[0]
        bare = logprobs_from_logits(base(full).logits[:, len(ids) - 1 : -1], torch.tensor([response]))[0]
    torch.testing.assert_close(reference[0][mask[0]], expected, rtol=0, atol=1e-5)
    assert (reference[0][mask[0]] - bare).abs().max() > 1e-2  # adapters off would be wrong
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(".reference." in n for n in trainable)
    assert any(".lora_B.policy." in n for n in trainable) and any(".lora_B.value." in n for n in trainable)


def test_checkpointing_keeps_every_critic_layout(tiny_model_dir: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=True)
    module = PPOModule(config, value="separate")
    module.configure_model()
    assert module.critic is not None and module.value_head is not None
