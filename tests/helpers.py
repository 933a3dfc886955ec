"""Test helpers shared across test modules."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as L


def load_script(path: Path, name: str):
    """Import a script outside the package (a benchmark) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, progress bar, summary, sanity check or checkpoints unless asked."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    return L.Trainer(**{**defaults, **kwargs})


def save_tiny_vit(path: Path) -> str:
    """A tiny vision model: neither a causal LM nor a sequence classifier. Returns its folder."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    ViTModel(config).save_pretrained(path)
    return str(path)


class KillAt(L.Callback):
    """Kill this process with SIGKILL (``kill -9``) when training batch number ``batch`` (0-based,
    counted over the whole run) is about to start: the checkpoints of earlier steps are on disk."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
