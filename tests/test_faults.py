"""Fault injection: NaN in a gradient or a parameter, Ctrl-C mid-run, a failing checkpoint write.
Each case asserts what is left behind: the message, the checkpoint, the export (or its absence)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

import perlhf.checkpointing
from perlhf.callbacks import ExportPretrained
from perlhf.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from perlhf.data import PreferenceDataModule, RolloutDataModule, SFTDataModule, synthetic
from perlhf.guards import NonFiniteError
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule, RewardModule, SFTModule
from perlhf.modules.rl_config import PPOSpec


def reward_module(model_dir: Path) -> RewardModule:
    config = ModelConfig(name_or_path=str(model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    return RewardModule(config, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))


def preference_data(data_dir: Path, model_dir: Path) -> PreferenceDataModule:
    files = {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "val.jsonl")}
    return PreferenceDataModule(
        path="json",
        data_files=files,
        tokenizer=str(model_dir),
        max_length=64,
        batch_size=16,
        max_train_samples=96,
        max_val_samples=16,
    )


def fit(
    module: L.LightningModule,
    data: L.LightningDataModule,
    root: Path,
    steps: int,
    *callbacks,
    ckpt_path: str | None = None,
    every: int = 1,
) -> L.Trainer:
    every_step = ModelCheckpoint(
        dirpath=root / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=every
    )
    trainer = quiet_trainer(
        root,
        max_steps=steps,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[*callbacks, every_step, ExportPretrained(dirpath=str(root / "export"))],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def assert_restores(module_factory, path: Path, expected: dict[str, torch.Tensor]) -> None:
    checkpoint = torch.load(path, weights_only=True)
    fresh = module_factory()
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for name, tensor in trainable(fresh).items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, expected[name]), name


class NaNGradient(L.Callback):
    """A NaN in one gradient at global step ``step`` (the loss stays finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            self.before = trainable(pl_module)
            param = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            param.grad.view(-1)[0] = float("nan")


class NaNParameter(L.Callback):
    """A NaN written into one trainable weight just before the update of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_nan_gradient_stops_the_reward_model_with_the_last_good_state(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    inject = NaNGradient(step=3)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at optimiser step 3"):
        fit(
            reward_module(tiny_model_dir),
            preference_data(preference_dir, tiny_model_dir),
            tmp_path,
            8,
            inject,
        )
    saved = tmp_path / "nan-guard" / "step-3.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    assert_restores(lambda: reward_module(tiny_model_dir), saved, inject.before)
    assert not (tmp_path / "export").exists()


def test_nan_parameter_stops_before_any_checkpoint_or_export_holds_it(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    good: dict = {}

    class Remember(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            good[trainer.global_step] = trainable(pl_module)

    last = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(
        NonFiniteError, match=r"non-finite parameters after the update .* at optimiser step 4"
    ) as err:
        fit(
            reward_module(tiny_model_dir),
            preference_data(preference_dir, tiny_model_dir),
            tmp_path,
            8,
            Remember(),
            NaNParameter(step=3),
        )
    assert "so this state is not saved" in str(err.value) and str(last) in str(err.value)
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert_restores(lambda: reward_module(tiny_model_dir), last, good[3])
    assert not (tmp_path / "nan-guard").exists() and not (tmp_path / "export").exists()


def test_nan_loss_stops_sft(tiny_model_dir: Path, tmp_path: Path) -> None:
    demos = synthetic.write_jsonl(synthetic.demonstrations(64, seed=0), tmp_path / "demos.jsonl")
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    data = SFTDataModule(path=str(demos), tokenizer=str(tiny_model_dir), max_length=64, batch_size=16)

    class NaNInput(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                self.before = trainable(pl_module)
                pl_module.model.get_input_embeddings().weight.data[batch["input_ids"][0, 0]] = float("nan")

    inject = NaNInput()
    with pytest.raises(NonFiniteError, match=r"non-finite loss at optimiser step 2"):
        fit(SFTModule(config), data, tmp_path, 6, inject)
    assert_restores(lambda: SFTModule(config), tmp_path / "nan-guard" / "step-2.ckpt", inject.before)
    assert not (tmp_path / "export").exists()


class SignalAt(L.Callback):
    """Send ``signum`` to this process while training batch ``batch`` (0-based) runs."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_saves_the_current_step_and_resumes_exactly(
    signum: int, tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    def run(root: Path, *callbacks, ckpt_path: str | None = None) -> RewardModule:
        L.seed_everything(0)
        module = reward_module(tiny_model_dir)
        fit(module, preference_data(preference_dir, tiny_model_dir), root, 8, *callbacks, ckpt_path=ckpt_path)
        return module

    # Lightning exits with status 1 after a KeyboardInterrupt; SIGTERM surfaces as SIGTERMException.
    stops = SystemExit if signum == signal.SIGINT else SIGTERMException
    with pytest.raises(stops):
        run(tmp_path / "stopped", SignalAt(batch=2, signum=signum))
    last = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the step in flight finished
    assert not (tmp_path / "stopped" / "export").exists()
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN)

    resumed = run(tmp_path / "resumed", ckpt_path=str(last))
    straight = run(tmp_path / "straight")
    expected = trainable(straight)
    for name, tensor in trainable(resumed).items():
        assert torch.equal(tensor, expected[name]), name


def test_exception_mid_run_saves_the_state_before_the_failed_step(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    def run(root: Path, *callbacks, ckpt_path: str | None = None) -> RewardModule:
        L.seed_everything(0)
        module = reward_module(tiny_model_dir)
        data = preference_data(preference_dir, tiny_model_dir)
        fit(module, data, root, 8, *callbacks, ckpt_path=ckpt_path, every=100)  # no step checkpoints
        return module

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", Crash())
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed, straight = run(tmp_path / "resumed", ckpt_path=str(last)), run(tmp_path / "straight")
    expected = trainable(straight)
    for name, tensor in trainable(resumed).items():
        assert torch.equal(tensor, expected[name]), name


def test_failed_checkpoint_write_keeps_the_previous_one(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, writes = torch.save, []

    def disk_fills_up(obj, f, *args, **kwargs):
        writes.append(f)
        if len(writes) > 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(perlhf.checkpointing.torch, "save", disk_fills_up)
    with pytest.raises(
        CheckpointWriteError, match=r"could not write checkpoint .*last.ckpt: No space left on device"
    ):
        fit(reward_module(tiny_model_dir), preference_data(preference_dir, tiny_model_dir), tmp_path, 8)
    monkeypatch.setattr(perlhf.checkpointing.torch, "save", real_save)
    folder = tmp_path / "ckpt"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], "no partial or temporary file is left"
    assert AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt")["global_step"] == 3


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_unreadable_checkpoint_is_named(
    content, tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"global_step": 1, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint {path} cannot be read .*truncated, corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_nan_gradient_stops_rl_before_the_next_rollout(
    tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module = PPOModule(
        config, algorithm="reinforce", ppo=PPOSpec(epochs=1, minibatch_size=16), log_samples_every=0
    )
    data = RolloutDataModule(
        path=str(prompts_file),
        reward_model=str(reward_export),
        val_fraction=0.1,
        prompts_per_rollout=8,
        samples_per_prompt=2,
        rollouts_per_epoch=4,
        max_new_tokens=8,
    )
    inject = NaNGradient(step=1)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at optimiser step 1"):
        fit(module, data, tmp_path, 4, inject)
    saved = tmp_path / "nan-guard" / "step-1.ckpt"
    fresh = lambda: PPOModule(config, algorithm="reinforce", ppo=PPOSpec(epochs=1))  # noqa: E731
    assert_restores(fresh, saved, inject.before)
    assert not (tmp_path / "export").exists()
