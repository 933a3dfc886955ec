"""LightningCLI entry point: ``python cli.py fit --config configs/quickstart/reward.yaml``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import perlhf.callbacks  # noqa: F401  (registers callbacks for short names in configs)
import perlhf.data  # noqa: F401  (registers DataModules)
import perlhf.modules  # noqa: F401  (registers LightningModules)
from perlhf.checkpointing import unreadable_checkpoint

APPLIED_ON_RESUME = ("center_coef", "ppo.", "log_samples_every")
"""Module arguments (dotted) that a resumed run may change: read afresh at every step."""


class PerlhfCLI(LightningCLI):
    """``LightningCLI`` whose ``--ckpt_path`` never replaces the config.

    Lightning's CLI overwrites the model's config with the checkpoint's hyperparameters, so a value
    given for the resumed run would be dropped without a word. Here the config is what runs: a
    checkpoint of another module class is refused; values that differ from the checkpoint's are
    applied when they are read afresh every step (``APPLIED_ON_RESUME``, each one reported) and
    refused otherwise (the model's shape, the optimiser, whose state the checkpoint restores, the
    KL controller, whose state it restores too).
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # absent, or "last"/"best" for the Trainer
            return
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise ValueError(unreadable_checkpoint(ckpt_path, err)) from err
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved.pop("_instantiator", None)
        saved_class = saved.pop("_class_path", None)
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        model = dump[subcommand]["model"]
        if saved_class and saved_class != model["class_path"]:
            raise ValueError(
                f"--ckpt_path {ckpt_path} was written by {saved_class}, but this config trains "
                f"{model['class_path']}; pass a checkpoint of a {model['class_path'].rsplit('.', 1)[-1]} "
                "run, or the config that wrote this checkpoint"
            )
        given, before = _flat(model.get("init_args", {})), _flat(saved)
        differ = sorted(k for k in before.keys() & given.keys() if not _same(before[k], given[k]))
        refused = [k for k in differ if not k.startswith(APPLIED_ON_RESUME)]
        if refused:
            lines = "; ".join(
                f"model.init_args.{k}: checkpoint {before[k]!r}, config {given[k]!r}" for k in refused
            )
            raise ValueError(
                f"--ckpt_path {ckpt_path} was trained with other values than this config: {lines}. These "
                "cannot change on resume (they shape the trained tensors or their restored state); use the "
                "checkpoint's values, or start a new run without --ckpt_path"
            )
        for key in differ:
            print(
                f"resuming {ckpt_path} with model.init_args.{key}={given[key]!r} (was {before[key]!r})",
                file=sys.stderr,
            )

    def after_instantiate_classes(self) -> None:
        """Checks that need both the module and the DataModule, before any model is loaded."""
        # getattr: a caller may skip instantiation (parse-only tools), leaving neither attribute.
        algorithm = getattr(getattr(self, "model", None), "algorithm", None)
        samples = getattr(getattr(self, "datamodule", None), "samples_per_prompt", None)
        if algorithm in ("rloo", "grpo") and samples is not None and samples < 2:
            raise ValueError(
                f"model.init_args.algorithm={algorithm!r} needs data.init_args.samples_per_prompt >= 2 "
                f"(its baseline compares the samples of one prompt), got {samples}"
            )


def _same(saved: Any, given: Any) -> bool:
    """Equal values; a local path also equals the absolute one checkpoints record."""
    if isinstance(saved, str) and isinstance(given, str) and saved != given and Path(given).exists():
        return Path(given).resolve() == Path(saved).resolve()
    return saved == given


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.")
    return out


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Any perlhf module with any perlhf DataModule (subclass mode); optimiser and scheduler are
    injected into the module (``auto_configure_optimizers=False``). Runs go under ``checkpoints/``.
    """
    return PerlhfCLI(
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
