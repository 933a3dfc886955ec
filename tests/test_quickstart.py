"""The one-command pipeline: SFT → reward model → RL on the built-in task, measured by the gold scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perlhf import quickstart
from perlhf.plot import scalars


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_load_config_rebases_every_path_and_applies_overrides(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    overrides = {"model.init_args.kl.coef": 0.3, "trainer.max_epochs": 2}
    config = quickstart.load_config("reinforce", root, overrides)
    assert config["model"]["init_args"]["model"]["name_or_path"] == f"{root}/sft-model/merged"
    assert config["data"]["init_args"]["data_files"]["test"] == f"{root}/data/heldout_prompts.jsonl"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == f"{root}/logs"
    assert config["model"]["init_args"]["kl"]["coef"] == 0.3 and config["trainer"]["max_epochs"] == 2
    assert not [s for s in _strings(config) if s.startswith("checkpoints/")]


def test_prepare_holds_out_phrasings(tmp_path: Path) -> None:
    from perlhf.data import synthetic

    quickstart.prepare(tmp_path, seed=0)

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "data" / name).read_text().splitlines()]

    heldout = set(synthetic.prompt_pool("heldout"))
    trained_on = {r["prompt"] for r in rows("prompts.jsonl") + rows("sft/train.jsonl")}
    trained_on |= {r["prompt"] for r in rows("preference/train.jsonl")}
    assert {r["prompt"] for r in rows("heldout_prompts.jsonl")} == heldout
    assert not trained_on & heldout and len(trained_on) == 12


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_rl_beats_sft_on_gold(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    summary = quickstart.run(root, "reinforce", plot=True)

    # The report and the picture are written; the report carries the measured numbers.
    report = (root / "report.md").read_text()
    assert "held-out pairwise accuracy" in report and "| rl |" in report
    assert json.loads((root / "report.json").read_text())["reward_model"] == summary["reward_model"]
    assert (root / "quickstart.png").stat().st_size > 10_000

    # The reward model learned the gold preferences (0.920 measured; chance is 0.5).
    assert summary["reward_model"]["accuracy"] >= 0.8
    # RL beat the SFT policy on the hidden gold score on phrasings no stage trained on, and
    # stayed near the reference (measured: 2.55 -> 4.97, KL 7.2 nats).
    heldout = summary["eval"]["heldout"]
    assert heldout["rl"]["gold_score"] > heldout["sft"]["gold_score"] + 0.3
    assert heldout["sft"]["gold_score"] > heldout["base"]["gold_score"] + 0.3  # SFT helped too
    assert 0.1 < heldout["rl"]["kl_to_reference"] < 12
    assert heldout["rl"]["reward_model_score"] > heldout["sft"]["reward_model_score"]

    # The task discriminates repeats (before the base learned lists, RL reached 36% of the ceiling
    # and 72% of its responses repeated a word): the base conditions on what it wrote (measured
    # 0.67; 1 ignores it; RL 0.11), the reward model ranks a loop well below distinct words, and RL
    # gets past a memoryless sampler's reach (measured: loop 1.59 vs distinct 6.04; 62% of the ceiling).
    from perlhf.data.rollout_utils import load_reward_model, reward_scores

    assert summary["repeat_ratio"]["base"] < 0.85
    assert summary["repeat_ratio"]["rl"] < summary["repeat_ratio"]["sft"] - 0.2
    assert heldout["rl"]["gold_score"] > 0.45 * summary["ceiling"]
    reward_model, reward_tokenizer = load_reward_model(str(root / "reward-model" / "adapter"), None)
    prompt = "List a few animals:"  # a held-out phrasing
    loop, distinct = reward_scores(
        reward_model, reward_tokenizer, [prompt + " cat cat cat cat", prompt + " cat dog horse mouse"]
    )
    assert distinct > loop + 1.0

    # TensorBoard has the gold score beside the reward-model score, and sample tables.
    logged = scalars(summary["runs"]["rl"], "train/gold_score", "val/gold_score", "train/kl", "val/reward")
    assert set(logged) == {"train/gold_score", "val/gold_score", "train/kl", "val/reward"}
    assert len(logged["train/gold_score"][1]) == 300


def test_ceiling_by_hand() -> None:
    from perlhf.data import synthetic

    prompt = "Which colours do you know?"
    assert synthetic.ceiling(prompt, 11, lambda w: 1) == 8.0  # one token a word: all 8 fit
    assert synthetic.ceiling(prompt, 5, lambda w: 1) == 5.0
    # One token per letter: red (3) + blue (4) + pink (4) = 11 fit in 12; green (5) does not.
    assert synthetic.ceiling(prompt, 12, lambda w: len(w.strip())) == 3.0
    assert synthetic.ceiling(prompt, 2, lambda w: len(w.strip())) == 0.0


def test_repeats_a_word_by_hand() -> None:
    from perlhf.data import synthetic

    assert not synthetic.repeats_a_word(" red blue green")
    assert synthetic.repeats_a_word(" red blue Red.")  # case and full stops as gold_score reads them
    assert synthetic.repeats_a_word(" red, red")
    # Only the first MAX_WORDS (8) words count, as in the gold score.
    assert not synthetic.repeats_a_word(" a b c d e f g h a")
    assert synthetic.gold_score("Name some colours:", " red blue Red.") == 1.5


def test_pretraining_lists_never_repeat_and_preference_data_does() -> None:
    """The base model's text teaches that lists do not repeat; the raters' data shows repeats and
    loops, so a reward model can learn to rank them low."""
    from perlhf.data import synthetic

    texts = list(synthetic.corpus(400, seed=0))
    complete = [t for t in texts if t.startswith("All the ")]
    assert 60 < len(complete) < 140  # a quarter
    for text in complete:
        topic = text.split(":")[0].removeprefix("All the ")
        assert sorted(text.split(":")[1].split()) == sorted(synthetic.TOPICS[topic])
    prompts = synthetic.prompt_pool("all")
    lists = [t[len(p) :] for t in texts for p in prompts if t.startswith(p)]
    lists = [r for r in lists if set(r.split()) <= set(synthetic.VOCABULARY)]  # gibberish left out
    assert len(lists) > 200 and not any(map(synthetic.repeats_a_word, lists))
    assert all(t.startswith("All the ") for t in synthetic.corpus(50, seed=1, complete=1.0))

    rows = list(synthetic.preference_pairs(2000, seed=0))
    responses = [r[k] for r in rows for k in ("chosen", "rejected")]
    share = sum(map(synthetic.repeats_a_word, responses)) / len(responses)
    loops = [r for r in responses if len(r.split()) >= 3 and len(set(r.split())) == 1]
    assert 0.1 < share < 0.4 and len(loops) > 50
    # Without label noise a loop loses to a distinct list of the same length on the topic.
    assert synthetic.gold_score("Name some animals:", " cat cat cat cat") == -0.5
