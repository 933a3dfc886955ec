"""Exports and checkpoints are self-contained and versioned: a second (short) run never replaces
the first run's export, later stages read the latest completed one, and both exports and
checkpoints load from any working directory, even when the run named its base model relatively."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from perlhf.callbacks import ExportPretrained
from perlhf.data import PreferenceDataModule
from perlhf.data.rollout_utils import load_reward_model
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import RewardModule


def test_exports_are_versioned_and_load_from_anywhere(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "run"
    (work / "models").mkdir(parents=True)
    os.symlink(tiny_model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}

    def run(steps: int) -> RewardModule:
        torch.manual_seed(0)
        config = ModelConfig(name_or_path="./models/tiny", lora=LoraSpec(r=4, alpha=8, dropout=0.0))
        module = RewardModule(config, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
        data = PreferenceDataModule(
            path="json",
            data_files=files,
            tokenizer="./models/tiny",
            max_length=64,
            batch_size=16,
            max_train_samples=64,
            max_val_samples=8,
        )
        callbacks = [
            ModelCheckpoint(
                dirpath=work / f"ckpt-{steps}", save_top_k=0, save_last=True, every_n_train_steps=1
            ),
            ExportPretrained(dirpath="exports/reward-model"),
        ]
        quiet_trainer(
            work, max_steps=steps, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks
        ).fit(module, datamodule=data)
        return module

    run(3)
    exports = work / "exports" / "reward-model"
    assert (exports / "adapter").resolve() == (exports / "versions" / "1" / "adapter").resolve()
    first = {p.name: p.read_bytes() for p in (exports / "versions" / "1" / "adapter").iterdir()}
    trained = run(2)  # a short debug run of the same config
    assert (exports / "adapter").resolve() == (exports / "versions" / "2" / "adapter").resolve()
    assert {p.name: p.read_bytes() for p in (exports / "versions" / "1" / "adapter").iterdir()} == first
    base = json.loads((exports / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == tiny_model_dir.resolve()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, _ = load_reward_model(str(exports / "adapter"))  # perlhf's loader
    plain = PeftModel.from_pretrained(  # plain transformers + peft, base from adapter_config.json
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), str(exports / "adapter")
    )
    resumed = RewardModule.load_from_checkpoint(str(work / "ckpt-2" / "last.ckpt"))
    expected = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, expected[name]), name
    assert model is not None and plain is not None
