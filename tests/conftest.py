"""Shared fixtures: a tiny pretrained backbone and the built-in task's data, built offline once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perlhf.data import synthetic
from perlhf.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GPT-2 with a few seconds of LM pretraining on task text, in from_pretrained layout."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-gpt2", arch="gpt2", pretrain_steps=200)


@pytest.fixture(scope="session")
def preference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated preference pairs: noisy-labelled train.jsonl, gold-labelled val.jsonl."""
    return synthetic.write_preference_data(tmp_path_factory.mktemp("pref"), n_train=4000, n_val=200)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)
