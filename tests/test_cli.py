"""LightningCLI: every shipped config parses, and the quickstart config trains through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from perlhf.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
# configs/scale/ holds overlays for other configs (tested in test_strategies.py).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "scale" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config: Path) -> None:
    cli = cli_main(["--config", str(config)], run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert cli.trainer.default_root_dir.endswith("checkpoints")


def test_quickstart_reward_config_trains_through_the_cli(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lay out what `python -m perlhf.quickstart` would write, then run the shipped config from there.
    quickstart = tmp_path / "checkpoints" / "quickstart"
    (quickstart / "data").mkdir(parents=True)
    (quickstart / "sft-model").mkdir()
    os.symlink(tiny_model_dir, quickstart / "tiny-gpt2")
    os.symlink(tiny_model_dir, quickstart / "sft-model" / "merged")  # stands in for the SFT stage
    os.symlink(preference_dir, quickstart / "data" / "preference")
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart" / "reward.yaml")
    short = [
        "--trainer.max_steps=120",
        "--trainer.val_check_interval=60",
        "--trainer.enable_progress_bar=false",
    ]

    cli = cli_main(["fit", "--config", config, *short])

    run_dir = Path(cli.trainer.log_dir).resolve()
    assert run_dir.is_relative_to((quickstart / "logs" / "reward").resolve())
    assert (
        tmp_path / "checkpoints" / "quickstart" / "reward-model" / "adapter" / "adapter_config.json"
    ).exists()
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/margin", "val/chosen_reward"} <= tags
    val_loss = [e.value for e in events.Scalars("val/loss")]
    assert val_loss[-1] < 0.6, val_loss  # ln 2 = 0.69 is chance
    assert events.Scalars("val/accuracy")[-1].value >= 0.65  # chance: 0.5

    # `--ckpt_path last`: the newest last.ckpt of this config's runs, whatever version_N holds it
    # (a failed run leaves a newer folder without checkpoints).
    (run_dir.parent / "version_9").mkdir()
    validated = cli_main(["validate", "--config", config, "--ckpt_path=last", *short])
    assert Path(validated.config.validate.ckpt_path).resolve() == run_dir / "checkpoints" / "last.ckpt"
    assert validated.trainer.callback_metrics["val/accuracy"] >= 0.65
