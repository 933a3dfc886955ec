"""``group_by_length``: batches of similar length (less padding); ``group_by_prompt``: each
prompt's pairs together. Every example still seen once per epoch, the order still a function of
``(seed, epoch)``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from test_preference_data import make_dm, write_jsonl

from perlhf.data import SFTDataModule
from perlhf.data.sampler import EpochSeededSampler, length_grouped, prompt_grouped
from perlhf.tiny import build_tiny_tokenizer

LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return str(path)


def _batches(order: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(order[i : i + size]) for i in range(0, len(order), size)]


def test_length_grouped_by_hand() -> None:
    # Mega-batches of 2 batches of 2: [0, 1, 2, 3] sorted by length (9, 5, 3, 1) -> (2, 0), (3, 1);
    # [4, 5, 6, 7] (8, 7, 4, 2) -> (6, 4), (7, 5); batches shuffled within their mega-batch only.
    seen = set()
    for seed in range(10):
        out = length_grouped(list(range(8)), LENGTHS, 2, 2, torch.Generator().manual_seed(seed))
        batches = _batches(out, 2)
        assert set(batches[:2]) == {(2, 0), (3, 1)} and set(batches[2:]) == {(6, 4), (7, 5)}
        seen.add(tuple(batches))
    assert len(seen) > 1  # the batch order within a mega-batch is shuffled


def test_a_partial_batch_stays_last() -> None:
    out = length_grouped(list(range(7)), LENGTHS[:7], 2, 2, torch.Generator().manual_seed(0))
    assert sorted(out) == list(range(7))
    assert out[-1] == 5 and set(_batches(out[4:6], 2)) == {(6, 4)}


def test_order_depends_on_seed_and_epoch_only() -> None:
    lengths = [random.Random(i).randint(1, 50) for i in range(100)]
    a, b = (EpochSeededSampler(range(100), seed=3, lengths=lengths, batch_size=4) for _ in range(2))
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    b.set_epoch(3)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="lengths: 99 values for 100 examples"):
        EpochSeededSampler(range(100), lengths=lengths[:99])


def _padding(loader) -> tuple[int, int, list[list[int]]]:
    """Padded positions, real tokens and the real token rows of one epoch."""
    padded = real = 0
    rows = []
    for batch in loader:
        mask = batch["attention_mask"]
        padded += int((mask == 0).sum())
        real += int(mask.sum())
        rows += [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], mask, strict=True)]
    return padded, real, rows


def test_sft_group_by_length_cuts_padding_and_keeps_every_example(tmp_path: Path, tok_dir: str) -> None:
    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "tea"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))} for _ in range(256)]
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    stats = {}
    for grouped in (False, True):
        dm = SFTDataModule(
            path="json", data_files=files, tokenizer=tok_dir, batch_size=8, group_by_length=grouped
        )
        dm.setup("fit")
        stats[grouped] = _padding(dm.train_dataloader())
    (pad_plain, real_plain, rows_plain), (pad_grouped, real_grouped, rows_grouped) = stats[False], stats[True]
    assert real_plain == real_grouped and sorted(rows_plain) == sorted(rows_grouped)
    assert pad_grouped < 0.2 * pad_plain, (pad_grouped, pad_plain)


def test_preference_group_by_length_uses_the_longer_answer(tmp_path: Path, tok_dir: str) -> None:
    rng = random.Random(1)
    rows = [
        {
            "prompt": "Name some colours:",
            "chosen": " red" * rng.randint(1, 30),
            "rejected": " blue" * rng.randint(1, 30),
        }
        for _ in range(128)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pads = {}
    for grouped in (False, True):
        dm = make_dm(path, tok_dir, batch_size=8, group_by_length=grouped)
        pads[grouped] = _padding(dm.train_dataloader())
    assert pads[True][1] == pads[False][1] and sorted(pads[True][2]) == sorted(pads[False][2])
    assert pads[True][0] < 0.5 * pads[False][0], (pads[True][0], pads[False][0])


def test_prompt_grouped_by_hand() -> None:
    # Groups in the order of their first index in the shuffled order, members in theirs.
    assert prompt_grouped([3, 0, 2, 1, 4], [0, 1, 0, 1, 2]) == [3, 1, 0, 2, 4]
    sampler = EpochSeededSampler(range(6), seed=1, groups=[0, 0, 1, 1, 2, 2])
    sampler.set_epoch(4)
    order = list(sampler)
    assert sorted(order) == list(range(6)) and order == list(sampler)
    assert all(order[i] // 2 == order[i + 1] // 2 for i in (0, 2, 4))
    with pytest.raises(ValueError, match="by length or by group, not both"):
        EpochSeededSampler(range(6), lengths=[1] * 6, groups=[0] * 6)


def test_preference_group_by_prompt_keeps_a_prompts_pairs_together(tmp_path: Path, tok_dir: str) -> None:
    # 12 prompts x 4 answers -> 6 pairs each (the InstructGPT layout), rows in shuffled order.
    rng = random.Random(2)
    words = ["red", "blue", "green", "cat", "dog", "tea"]
    rows = []
    for p in range(12):
        answers = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + f" {k}" for k in range(4)]
        rows += [
            {"prompt": f"Question {p}:", "chosen": answers[i], "rejected": answers[j]}
            for i in range(4)
            for j in range(i + 1, 4)
        ]
    rng.shuffle(rows)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    runs = {}
    for grouped in (False, True):
        dm = make_dm(path, tok_dir, batch_size=6, group_by_prompt=grouped, val_fraction=0.01)
        prompts = [prompt for batch in dm.train_dataloader() for prompt in _batch_prompts(batch)]
        runs[grouped] = (len(set(prompts)), sum(a != b for a, b in zip(prompts, prompts[1:], strict=False)))
    assert runs[True] == (12, 11)  # each prompt's pairs in one run
    assert runs[False][0] == 12 and runs[False][1] > 40  # a plain shuffle scatters them
    with pytest.raises(ValueError, match="set one of them to false"):
        make_dm(path, tok_dir, group_by_prompt=True, group_by_length=True)


def _batch_prompts(batch: dict) -> list[tuple[int, ...]]:
    """Each pair's prompt tokens (its chosen row's first ``prompt_lengths`` real tokens)."""
    out = []
    for i, n in enumerate(batch["prompt_lengths"].tolist()):
        out.append(tuple(batch["input_ids"][i][batch["attention_mask"][i].bool()][:n].tolist()))
    return out
