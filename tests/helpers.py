"""Test helpers shared across test modules."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L


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
