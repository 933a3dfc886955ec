"""The CLI explains itself: field docstrings in --help, nested group help, defaults as they are,
internal classes hidden; the RL defaults are the paper's REINFORCE."""

from __future__ import annotations

from pathlib import Path

import pytest

from perlhf.cli import StepsProgressBar, cli_main
from perlhf.models import ModelConfig
from perlhf.modules import PPOModule
from perlhf.modules.rl_config import PPOSpec


def help_text(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *args])
    assert done.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split())  # re-wrapped lines joined


def test_module_help_shows_every_field_description_and_the_default_optimiser(capsys) -> None:
    text = help_text(capsys, "--model.help", "PPOModule")
    # ModelConfig and LoraSpec attribute docstrings (not only the module's Args section).
    assert "--model.model.lora.r R Adapter rank. (type: int, default: 8)" in text
    assert "Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), local folder" in text
    assert "--model.model.quantization {none,4bit,8bit} QLoRA: load the frozen backbone" in text
    assert "default: perlhf.modules.base.default_optimizer (AdamW, lr 1e-4" in text
    assert "--model.algorithm {ppo,reinforce,rloo,grpo}" in text and "default: reinforce" in text
    assert "--model.max_rollouts MAX_ROLLOUTS Stop training after this many rollouts" in text
    assert "default: '')" in text  # an empty name_or_path is shown as such


@pytest.mark.parametrize(
    ("group", "phrase"),
    [
        (
            "ppo",
            "--model.ppo.cliprange CLIPRANGE Ratio clip ε (ppo, rloo, grpo). (type: float, default: 0.2)",
        ),
        ("kl", "--model.kl.coef COEF Initial (or fixed) β. (type: float, default: 0.05)"),
    ],
)
def test_nested_group_help(capsys, group: str, phrase: str) -> None:
    assert phrase in help_text(capsys, "--model", "PPOModule", f"--model.{group}.help")
    assert phrase in help_text(capsys, "--model.help", "PPOModule", f"--model.{group}.help")


def test_string_defaults_keep_their_newlines(capsys) -> None:
    text = help_text(capsys, "--data.help", "RolloutDataModule")
    assert "(type: str, default: '\\n\\nAssistant:')" in text


def test_internal_base_class_is_not_a_model_choice(capsys) -> None:
    text = help_text(capsys, "--help")
    assert "perlhf.RewardModule" in text and "TrainableOnlyModule" not in text


def test_rl_defaults_are_reinforce_with_one_step_per_rollout(tiny_model_dir) -> None:
    module = PPOModule(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert module.algorithm == "reinforce" and module.ppo.epochs == 1
    assert PPOModule(ModelConfig(name_or_path="x"), algorithm="ppo").ppo.epochs == 4
    assert PPOModule(ModelConfig(name_or_path="x"), algorithm="ppo", ppo=PPOSpec(epochs=2)).ppo.epochs == 2
    with pytest.raises(ValueError, match="ppo.epochs must be 1"):
        PPOModule(ModelConfig(name_or_path="x"), ppo=PPOSpec(epochs=2))
    with pytest.raises(ValueError, match="max_rollouts must be >= 1"):
        PPOModule(ModelConfig(name_or_path="x"), max_rollouts=0)


def test_progress_bar_of_a_max_steps_run_shows_no_negative_epoch_count() -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "reward.yaml"
    cli = cli_main(["--config", str(config)], run=False)  # max_steps: 1000, no max_epochs
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepsProgressBar) and cli.trainer.max_epochs in (None, -1)  # unbounded epochs
    bar.setup(cli.trainer, cli.model, "fit")
    assert bar._get_train_description(0).strip() == "Epoch 0"
    quiet = cli_main(["--config", str(config), "--trainer.enable_progress_bar=false"], run=False)
    assert quiet.trainer.progress_bar_callback is None
