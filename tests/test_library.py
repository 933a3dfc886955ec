"""perlhf from another Lightning project: the README's "Use as a library", executable.

Only names exported by ``perlhf`` itself are used: a reward model trained on the user's own
LightningDataModule, exported, loaded for inference, and used as the reward of a user-made,
sized rollout source that ``PPOModule`` trains on through a plain ``lightning.Trainer``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoTokenizer

from perlhf import (
    LoraSpec,
    ModelConfig,
    PPOModule,
    PPOSpec,
    RewardModel,
    RewardModule,
    RolloutDataModule,
    RolloutDataset,
)

PAIRS = [  # (prompt, chosen, rejected)
    ("Name some colours:", " red blue green", " cat dog"),
    ("Which animals do you know?", " cat dog horse", " red blue"),
    ("Name some fruits:", " apple pear", " saw hammer"),
    ("Name some tools:", " saw hammer", " apple"),
]
PROMPTS = [p for p, _, _ in PAIRS]


class PairData(L.LightningDataModule):
    """The user's own preference data: each batch holds B chosen sequences, then B rejected."""

    def __init__(self, tokenizer: str) -> None:
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def collate(self, pairs: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        texts = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        return dict(self.tokenizer(texts, padding=True, return_tensors="pt"))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(PAIRS, batch_size=4, shuffle=True, collate_fn=self.collate)


class Rollouts(L.LightningDataModule):
    """The user's own rollout source: sized (``RolloutDataset``), sampled when the loop asks."""

    def __init__(self, reward: RewardModel, steps: int, batch: int = 8) -> None:
        super().__init__()
        self.reward, self.steps, self.batch = reward, steps, batch
        self.sampled_at: list[int] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RolloutDataset(self.rollout, self.steps), batch_size=None)

    def rollout(self, i: int) -> dict:
        module = self.trainer.lightning_module
        tok = module.tokenizer
        prompts = [PROMPTS[(i * self.batch + j) % len(PROMPTS)] for j in range(self.batch)]
        enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt").to(module.device)
        response = module.generate(
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=6,
            do_sample=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # (N, R)
        eos = (response == tok.eos_token_id).long()
        mask = (eos.cumsum(-1) - eos) == 0  # up to and including the first EOS
        texts = tok.batch_decode(response.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
        self.sampled_at.append(module.rollout_step)
        return {
            "prompt_ids": enc["input_ids"],
            "prompt_mask": enc["attention_mask"],
            "response_ids": response,
            "response_mask": mask.long(),
            "scores": self.reward.score(prompts, texts),
        }


class TrainedAt(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(pl_module.rollout_step)


def trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"logger": False, **kwargs},
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def margin(module: RewardModule, data: PairData) -> torch.Tensor:
    with torch.no_grad():
        chosen, rejected = module(**data.collate(PAIRS)).chunk(2)
    return chosen - rejected


def test_reward_and_rl_with_your_own_data_and_a_plain_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, dropout=0.0))
    reward = RewardModule(config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = PairData(str(tiny_model_dir))
    reward.configure_model()  # the Trainer calls it too; here to measure before training
    before, start = margin(reward, data), snapshot(reward)
    trainer(tmp_path, max_steps=25).fit(reward, datamodule=data)
    after, end = margin(reward, data), snapshot(reward)
    assert (after > 0).all() and after.mean() > before.mean() + 1.0
    assert all(
        torch.equal(start[n], end[n]) for n in start if "lora_" not in n and "modules_to_save" not in n
    )
    assert any(not torch.equal(start[n], end[n]) for n in start if "lora_B" in n)

    scorer = RewardModel.from_pretrained(reward.save_pretrained(tmp_path / "reward"))
    policy = PPOModule(
        config,
        algorithm="reinforce",
        ppo=PPOSpec(epochs=1, minibatch_size=8),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        log_samples_every=1,
    )
    rollouts, trained_at = Rollouts(scorer, steps=3), TrainedAt()
    policy.configure_model()
    start = snapshot(policy)
    logger = CSVLogger(tmp_path / "logs", name="rl")
    trainer(tmp_path, max_steps=3, logger=logger, callbacks=[trained_at]).fit(policy, datamodule=rollouts)
    end = snapshot(policy)
    assert rollouts.sampled_at == trained_at.steps == [0, 1, 2]  # each rollout from the weights it updates
    assert all(torch.equal(start[n], end[n]) for n in start if "lora_" not in n and "value_head" not in n)
    assert any(not torch.equal(start[n], end[n]) for n in start if "lora_B.policy" in n)
    with open(Path(logger.log_dir) / "train_samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["step"] for r in rows} == {"1", "2", "3"} and all(r["prompt"] in PROMPTS for r in rows)


class Unsized(IterableDataset):
    """A generator source without ``__len__``: Lightning would read it one batch ahead."""

    def __init__(self, make) -> None:
        self.make = make

    def __iter__(self):
        i = 0
        while True:
            yield self.make(i)
            i += 1


@pytest.mark.parametrize("source", ["unsized", "workers"])
def test_a_source_that_would_train_on_stale_rollouts_is_refused(
    tiny_model_dir: Path, tmp_path: Path, source: str
) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0))
    policy = PPOModule(config, algorithm="reinforce", ppo=PPOSpec(epochs=1))
    sampled: list[int] = []

    def make(i: int) -> dict:
        sampled.append(i)
        return {}

    if source == "unsized":
        loader, match = DataLoader(Unsized(make), batch_size=None), "no __len__.*one step after"
    else:
        loader, match = DataLoader(RolloutDataset(make, 4), batch_size=None, num_workers=2), "num_workers=2"
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, max_steps=2).fit(policy, train_dataloaders=loader)
    if source == "unsized":  # Lightning read one rollout ahead; training stopped before any update
        assert sampled == [0] and policy.rollout_step == 0


def test_rollout_prompts_from_python_lists(tiny_model_dir: Path) -> None:
    reward = [{"function": "perlhf.data.synthetic.gold_reward"}]
    held_out = RolloutDataModule(
        path={"train": PROMPTS, "test": ["Name some birds:"]},
        reward_functions=reward,
        tokenizer=str(tiny_model_dir),
    )
    held_out.setup()
    assert [p.text for p in held_out.prompts["train"]] == PROMPTS
    assert [p.text for p in held_out.prompts["val"]] == ["Name some birds:"]
    split = RolloutDataModule(
        path=PROMPTS, val_fraction=0.25, reward_functions=reward, tokenizer=str(tiny_model_dir)
    )
    split.setup()
    train, val = ([p.text for p in split.prompts[k]] for k in ("train", "val"))
    assert len(val) == 1 and sorted(train + val) == sorted(PROMPTS)
