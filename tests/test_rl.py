"""PPOModule: the reference is the bare backbone, masks hold, each algorithm raises reward
with the backbone untouched, resume is exact, and the NaN guard leaves a loadable checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer, save_tiny_vit
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from perlhf.data import RolloutDataModule
from perlhf.guards import NonFiniteError
from perlhf.losses import logprobs_from_logits
from perlhf.models import LoraSpec, ModelConfig, build_causal_lm
from perlhf.modules import PPOModule
from perlhf.modules.rl_config import KLSpec, PPOSpec


def ppo_module(model_dir: Path, algorithm: str = "ppo", lr: float = 3e-3, **kwargs) -> PPOModule:
    config = ModelConfig(name_or_path=str(model_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    ppo = kwargs.pop("ppo", PPOSpec(epochs=2 if algorithm == "ppo" else 1, minibatch_size=32, vf_coef=0.5))
    return PPOModule(
        config, algorithm=algorithm, ppo=ppo, optimizer=lambda p: torch.optim.AdamW(p, lr=lr), **kwargs
    )


def rollout_data(prompts: Path, reward: Path, algorithm: str = "ppo", **kwargs) -> RolloutDataModule:
    k = 4 if algorithm == "rloo" else 2
    defaults = {
        "prompts_per_rollout": 64 // k,
        "samples_per_prompt": k,
        "rollouts_per_epoch": 10,
        "max_new_tokens": 12,
    }
    return RolloutDataModule(
        path=str(prompts), reward_model=str(reward), val_fraction=0.1, **{**defaults, **kwargs}
    )


class RecordRewards(L.Callback):
    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        self.rewards.append(batch["raw_scores"].mean().item())


def rollout_batch(module: PPOModule, responses: list[list[int]], prompts: list[str]) -> dict:
    """A hand-made rollout batch: left-padded prompts, right-padded responses cut after EOS."""
    tok = module.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, prompt_ids))
    R = max(map(len, responses))
    batch = {
        "prompt_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids]),
        "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]),
        "response_ids": torch.tensor([r + [pad] * (R - len(r)) for r in responses]),
    }
    lengths = [r.index(eos) + 1 if eos in r else len(r) for r in responses]
    batch["response_mask"] = torch.tensor([[int(i < n) for i in range(R)] for n in lengths])
    return batch


def test_reference_logprobs_are_the_bare_base_model(tiny_model_dir: Path) -> None:
    module = ppo_module(tiny_model_dir)
    module.configure_model()
    with torch.no_grad():  # make the policy adapter differ from the base
        for name, param in module.policy.named_parameters():
            if "lora_B.policy" in name:
                param.normal_(0, 0.5)
    tok = module.tokenizer
    words = [tok(" red blue green")["input_ids"], tok(" cat")["input_ids"] + [tok.eos_token_id]]
    prompts = ["Name some colours:", "Name some animals, please:"]
    batch = rollout_batch(module, words, prompts)
    idx = torch.arange(2)

    ref = module.reference_logprobs(batch, idx)
    policy = module._forward(batch, idx, with_values=False)["logprobs"]

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, (prompt, response) in enumerate(zip(prompts, words, strict=True)):
        ids = torch.tensor([tok(prompt)["input_ids"] + response])  # unpadded: no position tricks needed
        with torch.no_grad():
            logits = fresh(ids).logits[:, -len(response) - 1 : -1]
        expected = logprobs_from_logits(logits, torch.tensor([response]))[0]
        torch.testing.assert_close(ref[row, : len(response)], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(policy, ref, atol=1e-3), "policy adapter should change the log-probs"


def test_nothing_counts_on_prompt_padding_or_after_eos(tiny_model_dir: Path) -> None:
    module = ppo_module(tiny_model_dir)
    module.configure_model()
    tok = module.tokenizer
    eos = tok.eos_token_id
    responses = [tok(" red")["input_ids"] + [eos, 5, 6, 7], tok(" cat dog horse")["input_ids"] + [eos]]
    batch = rollout_batch(module, responses, ["Name some colours:", "Name some animals:"])
    junk = copy.deepcopy(batch)
    junk["response_ids"][batch["response_mask"] == 0] = 9  # garbage after EOS and in padding
    junk["prompt_ids"][batch["prompt_mask"] == 0] = 11  # garbage in left padding
    idx = torch.arange(2)
    mask = batch["response_mask"].float()
    assert mask[0].tolist()[: len(responses[0]) - 2] == [1.0] * (len(responses[0]) - 3) + [0.0]

    clean_out = module._forward(batch, idx, with_values=True)
    junk_out = module._forward(junk, idx, with_values=True)
    for key in ("logprobs", "values"):
        torch.testing.assert_close(clean_out[key] * mask, junk_out[key] * mask, rtol=0, atol=1e-6)

    batch["scores"] = torch.tensor([1.0, -1.0])
    kl = torch.randn_like(mask) * mask
    advantages, returns = module._advantages(batch, mask, kl, clean_out["values"])
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    last = mask.sum(-1).long() - 1
    # The sequence score lands on the EOS token (the last counted one), not on padding after it.
    gamma_returns = returns[torch.arange(2), last] + clean_out["values"][torch.arange(2), last]
    assert gamma_returns.shape == (2,)


@pytest.mark.parametrize("value", ["adapter", "shared"])
def test_split_backward_gives_the_joint_gradients(tiny_model_dir: Path, value: str) -> None:
    """One process, critic with its own forward: the policy loss is backpropagated before the
    value forward (so their activations never coexist) and the gradients equal the one-loss ones."""
    torch.manual_seed(0)
    module = ppo_module(tiny_model_dir, value=value, kl=KLSpec(penalty="loss"))
    module.configure_model()
    tok = module.tokenizer
    responses = [tok(" red blue")["input_ids"] + [tok.eos_token_id], tok(" cat dog horse")["input_ids"]]
    batch = rollout_batch(module, responses, ["Name some colours:", "Name some animals, please:"])
    idx, mask = torch.arange(2), batch["response_mask"].float()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name or "value_head" in name:  # non-zero so every gradient flows
                param.normal_(0, 0.1)
        old = module._forward(batch, idx, with_values=True)
        ref = module.reference_logprobs(batch, idx)
    advantages, returns = torch.randn_like(mask) * mask, torch.randn_like(mask) * mask
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    policy_grad = next(p for n, p in trainable.items() if "lora_A.policy" in n)
    seen_at_value_forward: list[bool] = []
    module.value_head.register_forward_pre_hook(
        lambda *_: seen_at_value_forward.append(policy_grad.grad is not None)
    )

    def grads(split: bool) -> tuple[int, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        module._split_backward = lambda: split
        seen_at_value_forward.clear()
        n_losses = 0
        args = (batch, idx, 0, mask, old["logprobs"], ref, old["values"], advantages, returns)
        for loss, _ in module._minibatch_losses(*args):
            loss.backward()
            n_losses += 1
        return n_losses, {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}

    n_split, split = grads(split=value == "adapter")
    n_joint, joint = grads(split=False)
    assert (n_split, n_joint) == ((2, 1) if value == "adapter" else (1, 1))
    assert seen_at_value_forward == [False]  # the joint pass: value forward before any backward
    assert set(split) == set(joint) and any("value" in n for n in joint)
    for name in joint:
        torch.testing.assert_close(split[name], joint[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_backward_runs_the_critic_after_the_policy_backward(tiny_model_dir: Path) -> None:
    module = ppo_module(tiny_model_dir)
    module.configure_model()
    assert module._split_backward()  # LoRA value adapter, no trainer: one process
    tok = module.tokenizer
    batch = rollout_batch(module, [tok(" red")["input_ids"] + [tok.eos_token_id]], ["Colours:"])
    idx, mask = torch.arange(1), batch["response_mask"].float()
    with torch.no_grad():
        old = module._forward(batch, idx, with_values=True)
    policy_grad = next(p for n, p in module.named_parameters() if "lora_B.policy" in n)
    seen: list[bool] = []
    module.value_head.register_forward_pre_hook(lambda *_: seen.append(policy_grad.grad is not None))
    args = (batch, idx, 0, mask, old["logprobs"], old["logprobs"], old["values"], mask, mask)
    for loss, _ in module._minibatch_losses(*args):
        loss.backward()
    assert seen == [True]


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce", "rloo"])
def test_each_algorithm_raises_reward_and_leaves_the_backbone_alone(
    algorithm: str, tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = ppo_module(tiny_model_dir, algorithm)
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    record = RecordRewards()
    data = rollout_data(prompts_file, reward_export, algorithm)
    quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[record]).fit(
        module, datamodule=data
    )

    first, last = sum(record.rewards[:4]) / 4, sum(record.rewards[-4:]) / 4
    assert len(record.rewards) == 20
    assert last > first + 0.5, f"{algorithm}: mean reward {first:.2f} -> {last:.2f}"
    for name, param in module.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"backbone tensor {name} changed"
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(trained), (
        "trainable set drifted"
    )
    changed = {n for n, p in module.named_parameters() if n in trained and not torch.equal(p, trained[n])}
    assert any(".lora_A.policy" in n for n in changed)
    if algorithm == "rloo":
        assert module.value_head is None and not any(".value." in n for n in trained)
    else:
        assert any(".lora_A.value" in n for n in changed) and "value_head.weight" in changed


def test_resume_reproduces_the_next_updates(
    tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    kl = KLSpec(coef=0.1, adaptive=True, target=0.5, horizon=200)

    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[PPOModule, L.Trainer]:
        torch.manual_seed(0)
        module = ppo_module(tiny_model_dir, kl=kl)
        data = rollout_data(prompts_file, reward_export, rollouts_per_epoch=3)
        callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]
        t = quiet_trainer(
            root, max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks
        )
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, t

    straight, _ = run(tmp_path / "straight", epochs=2)
    first, first_trainer = run(tmp_path / "first", epochs=1)
    checkpoint = torch.load(tmp_path / "first" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["rl_state"]["kl_coef"] == first.kl_ctl.value != 0.1
    assert all("lora_" in k or "value_head" in k for k in checkpoint["state_dict"])
    resumed, _ = run(tmp_path / "resumed", epochs=2, ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"))

    assert resumed.rollout_step == straight.rollout_step == 6
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-6)
    final = dict(resumed.named_parameters())
    for name, param in straight.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(final[name], param, rtol=0, atol=1e-5)


def test_nan_reward_stops_with_a_loadable_checkpoint(
    tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    class PoisonSecondRollout(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.good = {
                    n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad
                }
                batch["scores"][3] = float("nan")

    poison = PoisonSecondRollout()
    module = ppo_module(tiny_model_dir)
    with pytest.raises(NonFiniteError, match=r"non-finite reward-model scores at rollout step 1"):
        quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[poison]).fit(
            module, datamodule=rollout_data(prompts_file, reward_export)
        )
    saved = tmp_path / "nan-guard" / "rollout-1.ckpt"
    checkpoint = torch.load(saved, weights_only=True)
    fresh = ppo_module(tiny_model_dir)
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    restored = dict(fresh.named_parameters())
    for name, value in poison.good.items():
        assert torch.equal(restored[name], value), name


def test_policy_must_be_a_causal_lm(tmp_path: Path) -> None:
    vit = save_tiny_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match="not a causal language model"):
        build_causal_lm(ModelConfig(name_or_path=vit))


@pytest.mark.parametrize(
    ("finetune", "value"), [("lora", "shared"), ("lora", "separate"), ("full", "separate")]
)
def test_other_critic_layouts_and_full_finetuning_train(
    finetune: str, value: str, tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    config = ModelConfig(
        name_or_path=str(tiny_model_dir), finetune=finetune, lora=LoraSpec(r=8, alpha=16, dropout=0.0)
    )
    module = PPOModule(
        config,
        algorithm="ppo",
        value=value,
        ppo=PPOSpec(epochs=1, minibatch_size=32),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    module.configure_model()
    assert (module.reference is not None) == (finetune == "full"), (
        "full fine-tuning needs a frozen reference copy"
    )
    assert (module.critic is not None) == (value == "separate")
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    data = rollout_data(prompts_file, reward_export, rollouts_per_epoch=2)
    quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=data)
    after = dict(module.named_parameters())
    assert not torch.equal(after["value_head.weight"], before["value_head.weight"])
    policy_weight = next(
        n for n in before if n.startswith("policy.") and ("lora_A.policy" in n or finetune == "full")
    )
    assert not torch.equal(after[policy_weight], before[policy_weight])
    if module.reference is not None:
        assert all(not p.requires_grad for p in module.reference.parameters())


def test_policy_export_reloads_with_plain_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    module = ppo_module(tiny_model_dir)
    module.configure_model()
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    module.save_pretrained(tmp_path / "export")
    module.save_pretrained(tmp_path / "merged", merged=True)
    tok = module.tokenizer
    response = tok(" red blue")["input_ids"]
    batch = rollout_batch(module, [response], ["Name some colours:"])
    expected = module._forward(batch, torch.arange(1), with_values=False)["logprobs"][0]
    ids = torch.tensor([tok("Name some colours:")["input_ids"] + response])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = [
        PeftModel.from_pretrained(base, tmp_path / "export" / "policy").eval(),
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(),
    ]
    for model in reloaded:
        with torch.no_grad():
            logits = model(ids).logits[:, -len(response) - 1 : -1]
        torch.testing.assert_close(
            logprobs_from_logits(logits, torch.tensor([response]))[0], expected, rtol=0, atol=1e-5
        )
    assert (tmp_path / "export" / "value" / "adapter_config.json").exists()
    assert (tmp_path / "export" / "value_head.safetensors").exists()
