"""Tasks, judges and the evaluation metrics of the real-model report; LoRA presets on tiny models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from perlhf.evaluate import distinct_n, repeated_sentence_share
from perlhf.import_gguf import import_gguf, is_imported
from perlhf.models import LoraSpec, ModelConfig, build_causal_lm, build_reward_model, pretrained_location
from perlhf.tasks import bradley_terry_label, get_task, win_rate
from perlhf.tasks import sentiment as S
from perlhf.tiny import save_tiny


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([0.9, 0.1, 0.5, 0.0], [0.2, 0.3, 0.5, -0.4]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])


def test_bradley_terry_labels_follow_the_logistic() -> None:
    assert bradley_terry_label(0.2, 0.1, 0.0, random.Random(0)) is True  # noiseless: the higher score
    assert bradley_terry_label(0.1, 0.2, 0.0, random.Random(0)) is False
    rng = random.Random(0)
    share = sum(bradley_terry_label(0.4, 0.2, 0.2, rng) for _ in range(20000)) / 20000
    assert share == pytest.approx(1 / (1 + torch.e**-1), abs=0.01)  # σ((0.4 − 0.2) / 0.2) = σ(1) = 0.731


def test_degeneracy_metrics_by_hand() -> None:
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n([""], 2) == 0.0
    texts = ["Great. Great!", "I like it. It is fine.", "ok"]
    assert repeated_sentence_share(texts) == pytest.approx(1 / 3)
    # A clause of three or more words said twice counts too; short interjections do not.
    looped = "I'm so glad you're enjoying me, I'm so glad you're enjoying me, I'm just glad"
    short = ["Yes, yes, I like it", "Oh well; oh well, fine"]
    assert repeated_sentence_share([looped, *short]) == pytest.approx(1 / 3)


def test_sentiment_task_splits_topics_and_is_judged_by_vader() -> None:
    pytest.importorskip("vaderSentiment", reason=S.VADER_INSTALL)
    train, heldout = S.topics("train"), S.topics("heldout")
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(S.TOPICS) >= 300
    assert S.topics("heldout") == heldout  # fixed split, whatever the run's seed
    pool = S.prompt_pool("heldout")
    assert len(pool) == len(heldout) * len(S.TEMPLATES) and pool[0][0]["role"] == "user"
    task = get_task("sentiment")
    scores = task.judge([pool[0]] * 3, ["I love it, it is wonderful.", "It is a tool.", "I hate it, awful."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    assert get_task("topic-words").judge(["Name some colours:"], ["red blue"]) == [2.0]
    with pytest.raises(ValueError, match="built-in tasks"):
        get_task("nope")


def test_preference_rows_drop_ties_and_label_by_the_judge() -> None:
    pytest.importorskip("vaderSentiment", reason=S.VADER_INSTALL)
    prompt = [{"role": "user", "content": "What do you think of rain?"}]
    samples = ["Rain is wonderful and lovely.", "Rain is awful.", "Rain is water.", "Rain is water too."]
    rows = list(S.preference_rows([prompt], [samples], pairs_per_prompt=10, temperature=0.0))
    # 6 pairs, minus the tie between the two neutral answers.
    assert len(rows) == 5
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"]
        assert row["prompt"] == prompt and row["chosen"][0]["role"] == "assistant"
    capped = list(S.preference_rows([prompt], [samples], pairs_per_prompt=2, temperature=0.0))
    assert len(capped) == 2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama") / "m", arch="llama", pretrain_steps=0)


def _adapted(model: torch.nn.Module) -> set[str]:
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_lora_presets(tiny_llama: Path, tiny_model_dir: Path) -> None:
    def build(path: Path, targets: str | None, **lora) -> torch.nn.Module:
        return build_causal_lm(
            ModelConfig(name_or_path=str(path), lora=LoraSpec(target_modules=targets, **lora))
        )

    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert _adapted(build(tiny_llama, None)) == attention == _adapted(build(tiny_llama, "attention"))
    assert _adapted(build(tiny_llama, "all-linear")) == attention | {"gate_proj", "up_proj", "down_proj"}
    # GPT-2: the attention preset is the attention block only; all-linear adds the MLP.
    assert _adapted(build(tiny_model_dir, None)) == {"c_attn", "c_proj"}
    gpt2_all = build(tiny_model_dir, "all-linear")
    assert _adapted(gpt2_all) == {"c_attn", "c_proj", "c_fc"}
    assert any(".mlp.c_proj.lora_A" in n for n, _ in gpt2_all.named_parameters())
    # The reward model's score head is trained whole (modules_to_save), never LoRA-wrapped.
    rm = build_reward_model(
        ModelConfig(name_or_path=str(tiny_llama), lora=LoraSpec(target_modules="all-linear")), 0
    )
    assert not any("score" in n and "lora_" in n for n, _ in rm.named_parameters())
    # peft options pass through.
    dora = build(tiny_llama, None, use_dora=True, use_rslora=True)
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    assert dora.peft_config["default"].use_rslora
    with pytest.raises(ValueError, match="presets"):
        build(tiny_llama, ["all_linear"])


def test_gguf_locations_and_import_errors(tmp_path: Path) -> None:
    assert pretrained_location("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", {})
    gguf = tmp_path / "m.Q4_0.gguf"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained_location(gguf)
    gguf.write_bytes(b"")
    assert pretrained_location(gguf) == (str(tmp_path), {"gguf_file": "m.Q4_0.gguf"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not is_imported(tmp_path / "out")
