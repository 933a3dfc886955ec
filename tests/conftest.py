"""Shared fixtures: a tiny pretrained backbone and the built-in task's data, built offline once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from perlhf.data import PreferenceDataModule, synthetic
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import RewardModule
from perlhf.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GPT-2 with a few seconds of LM pretraining on task text, in from_pretrained layout."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-gpt2", arch="gpt2", pretrain_steps=200)


@pytest.fixture(scope="session")
def preference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated preference pairs: noisy-labelled train.jsonl, gold-labelled val.jsonl."""
    return synthetic.write_preference_data(tmp_path_factory.mktemp("pref"), n_train=4000, n_val=200)


@pytest.fixture(scope="session")
def reward_export(
    tiny_model_dir: Path, preference_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A LoRA reward model trained on the built-in task, exported in peft format."""
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    module = RewardModule(config, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = PreferenceDataModule(
        path="json", data_files=files, tokenizer=str(tiny_model_dir), max_length=64, batch_size=32
    )
    quiet_trainer(tmp_path_factory.mktemp("rm"), max_steps=150, limit_val_batches=0).fit(
        module, datamodule=data
    )
    return module.save_pretrained(tmp_path_factory.mktemp("rm-export") / "adapter")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_jsonl(
        synthetic.prompts(400, seed=2), tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    )


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)
