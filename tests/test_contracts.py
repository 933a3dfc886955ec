"""The rollout-batch contract names what is wrong; sample tables reach every kind of logger."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from perlhf import ModelConfig, PPOModule, log_samples
from perlhf.contracts import check_rollout_batch

EOS = 9


def batch(**changes) -> dict:
    """Two rows: prompts left-padded, responses right-padded, the first ending in EOS."""
    base = {
        "prompt_ids": torch.tensor([[0, 5, 6], [4, 5, 6]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "response_ids": torch.tensor([[7, EOS, 0], [7, 8, 8]]),
        "response_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "scores": torch.tensor([1.0, -1.0]),
    }
    return {k: v for k, v in (base | changes).items() if v is not None}


class Tok:
    eos_token_id = EOS

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids.tolist() if i != EOS)


def test_optional_fields_are_filled_from_the_required_ones() -> None:
    out = check_rollout_batch(batch(), Tok())
    assert out["ended_with_eos"].tolist() == [True, False]
    assert out["samples_per_prompt"] == 1 and torch.equal(out["raw_scores"], out["scores"])
    assert out["prompts"] == ["5 6", "4 5 6"] and out["responses"] == ["7", "7 8 8"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"scores": None}, r"lacks field\(s\) \['scores'\]"),
        (
            {"response_mask": torch.ones(2, 2, dtype=torch.long)},
            r"'response_mask' has shape \(2, 2\); expected .*\(2, 3\)",
        ),
        ({"scores": torch.zeros(3)}, r"'scores' has shape \(3,\)"),
        ({"prompt_ids": torch.zeros(2, 3)}, "'prompt_ids' holds token ids: use an integer dtype"),
        ({"prompt_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, "'prompt_mask' must be left-padded"),
        ({"response_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}, "'response_mask' must be right-padded"),
        ({"samples_per_prompt": 3}, "'samples_per_prompt' must be an int >= 1 dividing the 2 rows, got 3"),
        ({"responses": ["only one"]}, "'responses' must hold 2 texts"),
    ],
)
def test_a_bad_field_is_named(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_rollout_batch(batch(**changes), Tok())


def test_ppo_module_checks_the_batch_it_receives(tmp_path: Path) -> None:
    module = PPOModule(ModelConfig(name_or_path=str(tmp_path)), algorithm="rloo")  # never built
    with pytest.raises(ValueError, match="lacks field"):
        module.training_step({"prompt_ids": torch.zeros(2, 3, dtype=torch.long)}, 0)
    with pytest.raises(ValueError, match=r"'samples_per_prompt' must be an int >= 2.*rloo and grpo"):
        module.training_step(batch(), 0)


class TextLogger(Logger):
    """A logger with W&B's ``log_text`` (``WandbLogger`` itself needs the wandb package)."""

    name, version = "text", 0
    tables: list

    def __init__(self) -> None:
        super().__init__()
        self.tables = []

    def log_metrics(self, metrics, step=None) -> None: ...

    def log_hyperparams(self, params, *args, **kwargs) -> None: ...

    def log_text(self, key, columns, data, step=None) -> None:
        self.tables.append((key, columns, data, step))


class NumbersOnly(TextLogger):
    log_text = None


def test_samples_reach_tensorboard_csv_and_text_loggers(tmp_path: Path) -> None:
    tb, csv_logger, text = (
        TensorBoardLogger(tmp_path, name="tb"),
        CSVLogger(tmp_path, name="csv"),
        TextLogger(),
    )
    rows = [("Name | colours", "red\nblue", 1.5), ("Tools?", "saw", -0.25)]
    with pytest.warns(UserWarning, match="NumbersOnly has no way to store text"):
        log_samples(
            [tb, csv_logger, text, NumbersOnly()], "train/samples", ["prompt", "response", "reward"], rows, 7
        )
    log_samples([csv_logger], "train/samples", ["prompt", "response", "reward"], rows[1:], 8)
    tb.experiment.flush()

    events = EventAccumulator(tb.log_dir)
    events.Reload()
    (event,) = events.Tensors("train/samples/text_summary")
    table = event.tensor_proto.string_val[0].decode()
    assert event.step == 7 and "| Name \\| colours | red⏎blue | 1.500 |" in table
    with open(Path(csv_logger.log_dir) / "train_samples.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [
            ["step", "prompt", "response", "reward"],
            ["7", "Name | colours", "red\nblue", "1.5"],
            ["7", "Tools?", "saw", "-0.25"],
            ["8", "Tools?", "saw", "-0.25"],
        ]
    assert text.tables == [("train/samples", ["prompt", "response", "reward"], [list(r) for r in rows], 7)]
