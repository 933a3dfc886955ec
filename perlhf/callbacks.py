"""Callbacks: export the trained adapter in Hugging Face format when fitting ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info


class ExportPretrained(L.Callback):
    """Write the trained model with ``pl_module.save_pretrained`` at the end of ``fit``.

    The adapter goes to ``<dirpath>/adapter`` (peft format: ``PeftModel.from_pretrained`` on the
    base model loads it) and, with ``merged``, a standalone model to ``<dirpath>/merged``.

    Args:
        dirpath: Output folder; None: ``<trainer.log_dir>/export``.
        merged: Also write the adapter merged into the base weights.
    """

    def __init__(self, dirpath: str | None = None, merged: bool = False) -> None:
        self.dirpath = dirpath
        self.merged = merged

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        root = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")
        if trainer.is_global_zero:
            pl_module.save_pretrained(root / "adapter")
            if self.merged:
                pl_module.save_pretrained(root / "merged", merged=True)
            rank_zero_info(f"exported {type(pl_module).__name__} to {root}")
        trainer.strategy.barrier()
