"""Rewards: Python functions by import path, weighted sums logged per component, and a
RolloutDataModule scored by a function, a reward model, or both."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from perlhf.data import RolloutDataModule, synthetic
from perlhf.rewards import FunctionReward, RewardFunction, weighted_sum


def length_reward(
    prompts: list[str], responses: list[str], target: list[int], scale: float = 1.0
) -> list[float]:
    """-|words - target| · scale; ``target`` is a dataset column."""
    return [-abs(len(r.split()) - t) * scale for r, t in zip(responses, target, strict=True)]


def test_function_reward_by_import_path_gets_the_row_columns() -> None:
    reward = FunctionReward(f"{__name__}:length_reward", scale=2.0)
    scores = reward(["p", "q"], ["a b c", "a"], [{"target": 1}, {"target": 1}])
    torch.testing.assert_close(scores, torch.tensor([-4.0, 0.0]))
    assert reward.name == "length_reward"
    gold = FunctionReward("perlhf.data.synthetic.gold_reward")
    # +1 red, +1 blue, -0.5 repeat, -1 off-topic
    torch.testing.assert_close(gold(["Name some colours:"], [" red blue red cat"], [{}]), torch.tensor([0.5]))


def test_function_reward_errors() -> None:
    with pytest.raises(ValueError, match="cannot import"):
        FunctionReward("perlhf.data.synthetic.no_such_function")
    with pytest.raises(ValueError, match="import path"):
        FunctionReward("gold")
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        FunctionReward(lambda p, r: [1.0])(["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(ValueError, match="non-finite"):
        FunctionReward(lambda p, r: [float("nan")])(["a"], ["x"], [{}])


def test_weighted_sum_by_hand() -> None:
    parts = {"reward_model": torch.tensor([1.0, -1.0]), "gold": torch.tensor([2.0, 4.0])}
    total, stats = weighted_sum(parts, {"reward_model": 0.5, "gold": 2.0})
    torch.testing.assert_close(total, torch.tensor([4.5, 7.5]))
    assert stats == {"reward/reward_model": 0.0, "reward/gold": 3.0}


def _datamodule(tmp_path: Path, tiny_model_dir: Path, **kwargs: Any) -> RolloutDataModule:
    rows = [{"prompt": "Name some colours:", "target": 2}, {"prompt": "Name some animals:", "target": 1}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    dm = RolloutDataModule(
        path=str(path),
        tokenizer=str(tiny_model_dir),
        prompts_per_rollout=2,
        val_fraction=0.25,
        seed=0,
        **kwargs,
    )
    dm.setup()
    tok = dm.tokenizer
    words = tok(" red blue", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def generate(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.tensor([words] * prompt_ids.shape[0])

    policy = SimpleNamespace(
        device=torch.device("cpu"), tokenizer_name_or_path=str(tiny_model_dir), generate=generate
    )
    dm.trainer = SimpleNamespace(lightning_module=policy)
    return dm


def test_rollouts_scored_by_functions_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    functions = [
        RewardFunction("perlhf.data.synthetic.gold_reward", weight=1.0, name="gold"),
        RewardFunction(f"{__name__}.length_reward", weight=0.5),
    ]
    dm = _datamodule(tmp_path, tiny_model_dir, reward_functions=functions)
    assert dm.reward_model is None
    batch = next(iter(dm.train_dataloader()))
    gold = torch.tensor([synthetic.gold_score(p, " red blue") for p in batch["prompts"]])
    length = torch.tensor([-abs(2.0 - (2 if "colours" in p else 1)) for p in batch["prompts"]])
    torch.testing.assert_close(batch["raw_scores"], gold + 0.5 * length)
    assert batch["stats"]["reward/gold"] == pytest.approx(gold.mean().item())
    assert batch["stats"]["reward/length_reward"] == pytest.approx(length.mean().item())


def test_reward_model_and_function_summed(tmp_path: Path, tiny_model_dir: Path, reward_export: Path) -> None:
    functions = [{"function": "perlhf.data.synthetic.gold_reward", "weight": 2.0, "name": "gold"}]
    dm = _datamodule(
        tmp_path,
        tiny_model_dir,
        reward_model=str(reward_export),
        reward_weight=0.5,
        reward_functions=functions,
    )
    batch = next(iter(dm.train_dataloader()))
    model_scores = dm.score(batch["prompts"], batch["responses"])
    gold = torch.tensor([synthetic.gold_score(p, " red blue") for p in batch["prompts"]])
    torch.testing.assert_close(batch["raw_scores"], 0.5 * model_scores + 2.0 * gold)
    assert set(batch["stats"]) >= {"reward/reward_model", "reward/gold"}


def test_a_reward_is_required(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a reward"):
        RolloutDataModule(path="prompts.jsonl")
