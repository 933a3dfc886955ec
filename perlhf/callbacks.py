"""Callbacks: export the trained model in Hugging Face format; score rollouts with a gold function."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from perlhf.data import synthetic
from perlhf.guards import NonFiniteError, nonfinite_parameters
from perlhf.strategies import gathered_params


class ExportPretrained(L.Callback):
    """Write the trained model with ``pl_module.save_pretrained`` at the end of ``fit``.

    Each run's export is a new version, ``<dirpath>/versions/<n>/``: the adapter in ``adapter/``
    (peft format: ``PeftModel.from_pretrained`` on the base model loads it) and, with ``merged``, a
    standalone model in ``merged/``. Only once a version is complete do ``<dirpath>/adapter`` and
    ``<dirpath>/merged`` switch to it (symlinks, replaced atomically), so later stages reading
    them get the latest *completed* export, and a short debug run never destroys the export an
    earlier stage was trained on: every version stays under ``versions/``. The adapter records its
    base model as an absolute path, so it loads from any working directory. An interrupted run or
    non-finite weights export nothing.

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
        exporter = pl_module
        if isinstance(trainer.strategy, FSDPStrategy):
            # FSDP's state-dict hooks are collective and its units hold shards: gather the full
            # state through the strategy (every rank), rebuild an unsharded module on rank 0.
            state = trainer.strategy.lightning_module_state_dict()
            if trainer.is_global_zero:
                exporter = unsharded_copy(pl_module, state)
        with gathered_params(trainer):  # DeepSpeed ZeRO-3: whole parameters on every rank
            if trainer.is_global_zero:
                bad = nonfinite_parameters(exporter)
                if bad:
                    raise NonFiniteError(
                        f"not exporting to {root}: parameters {bad[:3]} hold NaN/inf; nothing was written"
                    )
                names = ["adapter"] + (["merged"] if self.merged else [])
                version = write_version(root, names, exporter.save_pretrained)
                rank_zero_info(
                    f"exported {type(pl_module).__name__} to {version}; {', '.join(names)} in {root} now "
                    f"point there (earlier exports stay in {root / 'versions'})"
                )
        trainer.strategy.barrier()


def write_version(root: Path, names: list[str], save: Callable[..., Any]) -> Path:
    """Export into a new ``root/versions/<n>`` and point ``root/<name>`` at it when complete."""
    versions = root / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in versions.iterdir() if p.name.isdigit()), default=0)
    partial = versions / f".incomplete-{number}-{os.getpid()}"
    for name in names:
        save(partial / name, merged=name == "merged")
    for config in partial.rglob("adapter_config.json"):
        pin_base_model(config)
    version = versions / str(number)
    os.replace(partial, version)
    for name in names:
        link = root / name
        if link.is_dir() and not link.is_symlink():  # an export from before versioning: keep it
            os.replace(link, versions / f"unversioned-{name}-{number}")
        staged = root / f".{name}.link-{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(Path("versions") / str(number) / name, target_is_directory=True)
        os.replace(staged, link)
    return version


def pin_base_model(config_file: Path) -> None:
    """Make a peft ``adapter_config.json``'s ``base_model_name_or_path`` absolute when it is a
    local folder (peft stores the path it was given, relative to the training run's directory)."""
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and Path(base).exists():
        config["base_model_name_or_path"] = str(Path(base).resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def unsharded_copy(module: L.LightningModule, state: dict[str, Any]) -> L.LightningModule:
    """A fresh, unsharded instance of ``module``'s class (from its saved hyperparameters) holding
    ``state`` (a full state dict, e.g. gathered from FSDP shards)."""
    clone = type(module)(**module.hparams)
    clone.configure_model()
    missing, unexpected = clone.load_state_dict(state, strict=False)
    lost = {name for name, p in clone.named_parameters() if p.requires_grad} & set(missing)
    if lost or unexpected:
        raise RuntimeError(
            f"gathered state does not fit {type(module).__name__}: missing {sorted(lost)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return clone


class GoldScore(L.Callback):
    """Score every rollout with a hidden gold function and log it beside the reward model's score.

    The gold function plays the human whom the reward model imitates; logging both is how reward
    over-optimisation shows (the reward-model score climbs while the gold score stalls or falls).
    Works with any rollout batch that carries ``prompts`` and ``responses`` texts
    (``RolloutDataModule``); for image prompts the scorer also gets each row's ``images``
    (``perlhf.data.shapes.gold_score``). Logs ``train/gold_score`` per rollout and ``val/gold_score`` per
    validation.

    Args:
        scorer: ``scorer(prompt, response) -> float``; default: the built-in task's gold scorer.
    """

    def __init__(self, scorer: Callable[[str, str], float] = synthetic.gold_score) -> None:
        self.scorer = scorer

    def _mean(self, batch: dict[str, Any]) -> tuple[float, int]:
        pairs = zip(batch["prompts"], batch["responses"], strict=True)
        if "images" in batch:  # image prompts: scorer(prompt, response, images)
            scores = [self.scorer(p, r, i) for (p, r), i in zip(pairs, batch["images"], strict=True)]
        else:
            scores = [self.scorer(p, r) for p, r in pairs]
        return sum(scores) / len(scores), len(scores)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mean, n = self._mean(batch)
        pl_module.log("train/gold_score", mean, on_step=True, on_epoch=False, batch_size=n)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        mean, n = self._mean(batch)
        pl_module.log(
            "val/gold_score", mean, on_step=False, on_epoch=True, batch_size=n, prog_bar=True, sync_dist=True
        )
