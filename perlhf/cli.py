"""LightningCLI entry point: ``python cli.py fit --config configs/quickstart/reward.yaml``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI

import perlhf.callbacks  # noqa: F401  (registers callbacks for short names in configs)
import perlhf.data  # noqa: F401  (registers DataModules)
import perlhf.modules  # noqa: F401  (registers LightningModules)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Any perlhf module with any perlhf DataModule (subclass mode); optimiser and scheduler are
    injected into the module (``auto_configure_optimizers=False``). Runs go under ``checkpoints/``.
    """
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "checkpoints"},
        args=args,
        run=run,
    )


def main(args: Any = None) -> None:
    cli_main(args)


if __name__ == "__main__":
    main()
