"""One metric vocabulary: every scalar the README names and every scalar ``perlhf.plot`` reads is
one that the modules log, under that exact name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import Logger

from perlhf.callbacks import GoldScore
from perlhf.data import PreferenceDataModule, RolloutDataModule, SFTDataModule, synthetic
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule, RewardModule, SFTModule
from perlhf.modules.rl_config import PPOSpec
from perlhf.plot import PLOTTED

# The recording logger below keeps scalars only; sample tables have no place in it.
pytestmark = pytest.mark.filterwarnings("ignore:Names has no way to store text")

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT_TABLES = {"train/samples"}
"""Named in the README, logged as text, not as a scalar."""
RETIRED = {
    "train/loss_step",
    "train/loss_epoch",
    "train/accuracy_step",
    "train/reward_mean",
    "train/reward/raw_mean",
}


class Names(Logger):
    """Records the name of every scalar logged."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    @property
    def name(self) -> str:
        return "names"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.names |= set(metrics) - {"epoch"}


def fit(module: Any, data: Any, root: Path, **kwargs: Any) -> set[str]:
    names = Names()
    module.optimizer = lambda p: torch.optim.AdamW(p, lr=1e-3)
    trainer = quiet_trainer(root, logger=names, log_every_n_steps=1, limit_val_batches=1, **kwargs)
    trainer.fit(module, datamodule=data)
    return names.names


@pytest.fixture(scope="module")
def logged(
    tiny_model_dir: Path, preference_dir: Path, prompts_file: Path, tmp_path_factory
) -> dict[str, set]:
    root = tmp_path_factory.mktemp("names")
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    sft_files = {
        "train": str(synthetic.write_jsonl(synthetic.demonstrations(16), root / "sft" / "train.jsonl")),
        "test": str(synthetic.write_jsonl(synthetic.demonstrations(8, seed=1), root / "sft" / "test.jsonl")),
    }
    sft = SFTDataModule(path="json", data_files=sft_files, tokenizer=str(tiny_model_dir), batch_size=8)
    pairs = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    prefs = PreferenceDataModule(path="json", data_files=pairs, tokenizer=str(tiny_model_dir), batch_size=8)
    # Every reward post-processing step on, so that each of its statistics is logged.
    rollouts = RolloutDataModule(
        path=str(prompts_file),
        reward_functions=[{"function": "perlhf.data.synthetic.gold_reward", "name": "gold"}],
        prompts_per_rollout=4,
        samples_per_prompt=2,
        rollouts_per_epoch=2,
        max_new_tokens=4,
        missing_eos_penalty=-1.0,
        normalize_rewards=True,
        reward_clip=5.0,
    )
    rl = PPOModule(config, algorithm="ppo", ppo=PPOSpec(epochs=1, minibatch_size=8), log_samples_every=1)
    return {
        "sft": fit(SFTModule(config), sft, root / "sft", max_steps=2, val_check_interval=2),
        "reward": fit(
            RewardModule(config, share_prefix=True), prefs, root / "rm", max_steps=2, val_check_interval=2
        ),
        "rl": fit(rl, rollouts, root / "rl", max_epochs=1, callbacks=[GoldScore()]),
    }


def test_readme_names_only_logged_scalars(logged: dict[str, set]) -> None:
    every = set().union(*logged.values())
    named = set(re.findall(r"`((?:train|val|test)/[\w/<>]+)`", README.read_text())) - TEXT_TABLES
    assert len(named) > 30
    patterns = {name: re.compile(re.sub(r"<\w+>", r"[^/]+", name) + r"\Z") for name in named}
    missing = sorted(name for name, pattern in patterns.items() if not any(map(pattern.match, every)))
    assert not missing, f"README names scalars no module logs: {missing}; logged: {sorted(every)}"


def test_plots_read_logged_scalars_and_old_names_are_gone(logged: dict[str, set]) -> None:
    for run in ("reward", "rl"):
        assert set(PLOTTED[run]) <= logged[run], sorted(logged[run])
    assert not RETIRED & set().union(*logged.values())
    # One name for the RL reward: the mean reward per response, in training and in validation.
    assert {"train/reward", "val/reward", "train/reward/gold"} <= logged["rl"]
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy"} <= logged["reward"]
