"""Stages in order: a stage started too early names the stage to run first; ``--ckpt_path last``
finds the newest checkpoint; ``max_rollouts`` sets the RL run's length in rollouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from perlhf import quickstart, quickstart_real, quickstart_vlm
from perlhf.cli import cli_main
from perlhf.data import RolloutDataModule
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule
from perlhf.modules.rl_config import PPOSpec
from perlhf.stages import PREPARE_STEPS, StageOrderError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart"


def test_prepare_steps_name_the_pipelines_roots() -> None:
    roots = {quickstart.DEFAULT_ROOT, quickstart_vlm.DEFAULT_ROOT, quickstart_real.DEFAULT_ROOT}
    assert set(PREPARE_STEPS) == roots


def test_a_stage_before_its_inputs_names_the_command_that_writes_them(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Nothing prepared yet: the prepare step comes first.
    with pytest.raises(StageOrderError, match=r"run `perlhf quickstart --prepare-only` first"):
        cli_main(["fit", "--config", str(QUICKSTART / "sft.yaml")])

    # Prepared (model and data), but the SFT stage has not exported its model yet.
    root = tmp_path / "checkpoints" / "quickstart"
    root.mkdir(parents=True)
    os.symlink(tiny_model_dir, root / "tiny-gpt2")
    quickstart.prepare(root.relative_to(tmp_path))
    with pytest.raises(StageOrderError) as early:
        cli_main(["fit", "--config", str(QUICKSTART / "reward.yaml")])
    message = str(early.value)
    assert "model.init_args.model.name_or_path='checkpoints/quickstart/sft-model/merged'" in message
    assert f"run `perlhf fit --config {QUICKSTART / 'sft.yaml'}` first" in message
    # The RL stage needs both earlier stages.
    with pytest.raises(StageOrderError) as early:
        cli_main(["fit", "--config", str(QUICKSTART / "reinforce.yaml")])
    assert f"{QUICKSTART / 'sft.yaml'}" in str(early.value) and f"{QUICKSTART / 'reward.yaml'}" in str(
        early.value
    )


def test_ckpt_path_last_without_any_run_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"no last.ckpt under checkpoints/quickstart/logs/reward/version_\*"
    ):
        cli_main(["validate", "--config", str(QUICKSTART / "reward.yaml"), "--ckpt_path=last"])


def test_max_rollouts_ends_rl_after_that_many_rollouts(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    # ppo: 2 epochs x 2 minibatches = 4 optimiser steps per rollout, so max_steps is not the length.
    module = PPOModule(config, algorithm="ppo", ppo=PPOSpec(epochs=2, minibatch_size=8), max_rollouts=3)
    module.optimizer = lambda p: torch.optim.AdamW(p, lr=1e-3)
    data = RolloutDataModule(
        path=str(prompts_file),
        reward_functions=[{"function": "perlhf.data.synthetic.gold_reward"}],
        prompts_per_rollout=8,
        samples_per_prompt=2,
        rollouts_per_epoch=10,
        max_new_tokens=4,
    )
    trainer = quiet_trainer(tmp_path, max_epochs=5, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert module.rollout_step == 3 and trainer.global_step == 3 * 4
    assert data.rollouts_drawn == 3
