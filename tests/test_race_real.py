"""benchmarks/race_real.py end to end on a stand-in for the real model's folder (the tiny chat
model, hand-written pairs, the session's LoRA reward model): both tools, reward model on HH-like
pairs and GRPO, one measured step each, then the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_script

pytest.importorskip("trl")
pytest.importorskip("vaderSentiment")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
RACE = Path(__file__).resolve().parents[1] / "benchmarks" / "race_real.py"
TOPICS = ["rivers", "cats", "trains", "tea", "maps", "rain"]


def _load_race():
    return load_script(RACE, "perlhf_race_real")


def _turn(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def _root(tmp_path: Path, model: Path, reward: Path, model_dir: str) -> Path:
    """A folder laid out as ``python -m perlhf.quickstart_real`` leaves it."""
    root = tmp_path / "root"
    shutil.copytree(model, root / model_dir)
    shutil.copytree(reward, root / "reward-model" / "adapter")
    (root / "data" / "preference").mkdir(parents=True)
    for split in ("train", "val"):
        rows = [
            {
                "prompt": _turn("user", f"What do you think of {t}?"),
                "chosen": _turn("assistant", f"I love {t}, they are great."),
                "rejected": _turn("assistant", f"{t} are bad."),
            }
            for t in TOPICS
        ]
        (root / "data" / "preference" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    prompts = [{"prompt": _turn("user", f"How do you feel about {t}?")} for t in TOPICS]
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


def test_pairs_share_the_transcript_and_differ_in_the_answer(
    tmp_path: Path, tiny_model_dir: Path, reward_export: Path
) -> None:
    race = _load_race()
    root = _root(tmp_path, tiny_model_dir, reward_export, race.MODEL_DIR)
    short = race.pairs(root, "train", 0, 3)
    hh = race.pairs(root, "train", 2, 3)

    def shared(chosen: list[int], rejected: list[int]) -> int:
        return next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)

    for (c, r), (hc, hr) in zip(short, hh, strict=True):
        assert c != r and hc[-len(c) + shared(c, r) :] == c[shared(c, r) :]  # same answer at the end
        assert shared(hc, hr) > shared(c, r) + 10  # two earlier exchanges in the shared prompt
    batch = race.collate(hh[:2], pad_id=1)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"][2].sum() == len(hh[0][1])


def test_race_writes_both_tools_side_by_side(
    tmp_path: Path, tiny_model_dir: Path, reward_export: Path
) -> None:
    race = _load_race()
    root = _root(tmp_path, tiny_model_dir, reward_export, race.MODEL_DIR)
    out = tmp_path / "out"
    race.main(
        ["--root", str(root), "--jobs", "rm-hh", "grpo", "--rm-steps", "1", "--rm-pairs", "2"]
        + ["--hh-turns", "2", "--eval-pairs", "4", "--rl-steps", "1", "--rl-prompts", "2"]
        + ["--rl-samples", "2", "--minibatch", "2", "--new-tokens", "4", "--eval-prompts", "2"]
        + ["--threads", "1", "--out", str(out)]
    )
    data = json.loads((out / "race.json").read_text())
    records = {(r["job"], r["framework"]): r for r in data["results"]}
    assert set(records) == {(j, f) for j in ("rm-hh", "grpo") for f in ("perlhf", "trl")}
    for r in records.values():
        assert "error" not in r, r.get("error")
        assert r["step_s"] > 0 and r["peak_mb"] >= r["import_rss_mb"] > 0
    for job in ("rm-hh", "grpo"):
        # Same model, same adapter placement: the same trainable parameter count on both sides.
        assert records[job, "perlhf"]["trainable_params"] == records[job, "trl"]["trainable_params"] > 0
    for framework in ("perlhf", "trl"):
        rm, rl = records["rm-hh", framework], records["grpo", framework]
        assert 0.0 <= rm["accuracy"] <= 1.0 and rm["pairs_per_s"] == pytest.approx(2 / rm["step_s"])
        assert rl["samples_per_step"] == 4 and 0 < rl["response_tokens"] <= 4
        assert rl["phases_s"]["generate"] > 0 and rl["phases_s"]["update"] > 0
        assert -1.0 <= rl["judge"]["judge_score"] <= 1.0 and 0.0 <= rl["judge"]["win_rate"] <= 1.0
    ratios = data["summary"]
    # Same init, tokens, order, loss and optimiser: the same loss at every step, to rounding.
    p, t = records["rm-hh", "perlhf"], records["rm-hh", "trl"]
    assert len(p["losses"]) == len(t["losses"]) == 2
    assert p["losses"] == pytest.approx(t["losses"], abs=1e-5)
    assert ratios["rm-hh"]["loss_gap_early"] < 1e-5 and ratios["rm-hh"]["loss_gap_first_step"] is None
    p, t = records["grpo", "perlhf"], records["grpo", "trl"]
    assert ratios["grpo"]["speed"] == pytest.approx(p["samples_per_s"] / t["samples_per_s"])
    assert ratios["rm-hh"]["memory"] == pytest.approx(
        records["rm-hh", "perlhf"]["peak_mb"] / records["rm-hh", "trl"]["peak_mb"]
    )
    text = (out / "race.md").read_text()
    for job in ("rm-hh", "grpo"):
        table = text.split(f"### {job}")[1].split("\n\n")[1].splitlines()
        assert [row.split(" | ")[0] for row in table[2:]] == ["| perlhf", "| TRL"]
        assert len({row.count("|") for row in table}) == 1  # every row has every column
    assert (out / "race.png").stat().st_size > 0

    # A later run of one job keeps the other job's records.
    race.main(
        ["--root", str(root), "--jobs", "rm-hh", "--rm-steps", "1", "--rm-pairs", "2", "--hh-turns", "2"]
        + ["--eval-pairs", "4", "--threads", "1", "--out", str(out)]
    )
    again = json.loads((out / "race.json").read_text())
    assert {(r["job"], r["framework"]) for r in again["results"]} == set(records)
    assert again["results"][-1]["job"] == "rm-hh" and set(again["meta"]["commands"]) == {
        f"{j} {f}" for j in ("rm-hh", "grpo") for f in ("perlhf", "trl")
    }


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_reward_model_schedule_is_transformers_curve(schedule: str) -> None:
    """perlhf's side steps the lr along the curve TRL's ``lr_scheduler_type`` gives (no warm-up):
    cosine ``2e-3 · ½(1 + cos(π t / 4))`` = 2e-3, 1.707e-3, 1e-3, 0.293e-3, 0 over 4 steps."""
    import torch
    from transformers import get_scheduler

    race = _load_race()
    spec = {"rm_schedule": schedule, "warmup": 1, "rm_steps": 3}

    def lrs(make) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        scheduler = make(optimizer)
        out = []
        for _ in range(5):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return out

    ours = race.rm_scheduler(spec)
    theirs = lrs(lambda opt: get_scheduler(schedule, opt, num_warmup_steps=0, num_training_steps=4))
    assert lrs(ours or (lambda opt: None)) == pytest.approx(theirs, abs=1e-12)
    if schedule == "cosine":
        assert theirs == pytest.approx([2e-3, 1.7071068e-3, 1e-3, 0.2928932e-3, 0.0], abs=1e-9)
    else:
        assert ours is None and theirs == [2e-3] * 5


def test_loss_agreement_by_hand() -> None:
    race = _load_race()
    got = race.loss_agreement([0.69, 0.60, 0.50, 0.40], [0.69, 0.605, 0.52, 0.30], early=2)
    assert got == {"loss_gap_early": pytest.approx(0.005), "loss_gap_first_step": 3, "loss_steps": 4}
    assert race.loss_agreement([0.5], [0.5])["loss_gap_first_step"] is None
