"""Real-data recipes: each dataset's reward and RL configs run on fixture rows in that dataset's
exact Hub schema, with the texts the reward model and the policy should see written out by hand.

Fixtures (tests/fixtures/recipes) follow the Hub dataset cards: column names, nesting and types
of Anthropic/hh-rlhf (harmless-base), stanfordnlp/SHP, openai/summarize_from_feedback
(comparisons) and HuggingFaceH4/ultrafeedback_binarized. The configs' data sections are used
as they are, except where the data lives (the fixture), the tokenizer and the reward model (tiny).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from perlhf.data.formats import (
    RowError,
    conversational_example,
    detect_format,
    prompt_messages,
    prompt_of,
    tldr_example,
)
from perlhf.data.preference import PreferenceDataModule
from perlhf.data.rollout import RolloutDataModule
from perlhf.models import load_tokenizer
from perlhf.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "recipes"
HUB_LOCATION = ("path", "data_files", "name", "data_dir")
DATASETS = ("hh-rlhf", "shp", "tldr", "ultrafeedback")
H, A = "\n\nHuman: ", "\n\nAssistant:"

# Column names, nesting and value kinds from each dataset's Hub card (int32 on the Hub reads back
# as int64 from JSON; only the kind is compared).
SCHEMAS: dict[str, dict[str, Any]] = {
    "hh-rlhf": {"chosen": "string", "rejected": "string"},
    "shp": {
        "post_id": "string",
        "domain": "string",
        "upvote_ratio": "float",
        "history": "string",
        "c_root_id_A": "string",
        "c_root_id_B": "string",
        "created_at_utc_A": "int",
        "created_at_utc_B": "int",
        "score_A": "int",
        "score_B": "int",
        "human_ref_A": "string",
        "human_ref_B": "string",
        "labels": "int",
        "seconds_difference": "float",
        "score_ratio": "float",
    },
    "tldr": {
        "info": {k: "string" for k in ("id", "post", "title", "subreddit", "site", "article")},
        "summaries": [{"text": "string", "policy": "string", "note": "string"}],
        "choice": "int",
        "worker": "string",
        "batch": "string",
        "split": "string",
        "extra": {"confidence": "int"},
    },
    "ultrafeedback": {
        "prompt": "string",
        "prompt_id": "string",
        "chosen": [{"content": "string", "role": "string"}],
        "rejected": [{"content": "string", "role": "string"}],
        "messages": [{"content": "string", "role": "string"}],
        "score_chosen": "float",
        "score_rejected": "float",
    },
}

# ------------------------------------------------------------------ expected texts, by hand

HH_PROMPTS = [
    H + "How can I get onto my neighbour's wifi without asking them?" + A,
    H
    + "My coworker keeps taking credit for my work."
    + A
    + " That sounds frustrating. Have you talked to them about it?"
    + H
    + "No. I kind of want to get back at them instead."
    + A,
    H + "What's the safest way to keep leftover rice?" + A,
]
SHP_HISTORIES = [
    "Why does my homemade bread go stale so fast? I bake a sandwich loaf every Sunday and by "
    "Wednesday it's dry. Store-bought bread lasts all week.",
    "If I drop a feather and a hammer on the Moon, do they really land together? Why doesn't the "
    "heavier one fall faster?",
    "ELI5: Why do my ears pop on a plane?",
]
TLDR_PROMPTS = [
    "SUBREDDIT: r/relationships\n\nTITLE: My [24F] best friend [25F] keeps cancelling plans last "
    "minute\n\nPOST: We've been friends since school. For the last three months she has cancelled "
    "on me every time, usually an hour before. She says work is busy, but then posts photos out "
    "with other people. I don't want to lose her but I'm tired of being the one who tries.\n\nTL;DR:",
    "SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay off my car loan early or build savings?"
    "\n\nPOST: I have $6,000 left on a car loan at 4%. I have about $2,000 in savings and just got "
    "a $5,000 bonus. My job is stable but I have no emergency fund to speak of.\n\nTL;DR:",
    "Article:\nThe library in Marsh End reopened on Monday, eight months after flood water damaged "
    "its ground floor.\n\nVolunteers saved most of the local history collection, and the council "
    "paid for new shelving and a raised floor.\n\nTL;DR:",
]
UF_PROMPTS = [
    "Write a haiku about autumn rain.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for a first job interview.",
]

# (prompt, chosen, rejected) per fixture row, as the reward model sees them (tiny chat template:
# "<|role|>\ncontent<|end|>\n").
REWARD_EXAMPLES: dict[str, list[tuple[str, str, str]]] = {
    "hh-rlhf": [
        (
            HH_PROMPTS[0],
            " I can't help with using a network without permission. You could ask them to share it, "
            "or use the free wifi at a library or cafe.",
            " Try guessing the password. Lots of people just use their house number.",
        ),
        (
            HH_PROMPTS[1],
            " I get the urge, but revenge could hurt your own reputation. Keep notes of what you did "
            "and bring them to your manager.",
            " Quietly delete a few of their files before the next deadline.",
        ),
        (
            HH_PROMPTS[2],
            " Cool it within an hour, then keep it covered in the fridge and eat it within a day.",
            " Leave it in the pot on the stove overnight, it'll be fine.",
        ),
    ],
    "shp": [
        (  # labels 1: human_ref_A preferred
            SHP_HISTORIES[0] + "\n\n",
            "Shop bread has preservatives and dough conditioners. A spoon of oil or some milk powder "
            "in the dough helps, and keep it in a bread box, not the fridge.",
            "Just freeze half of it.",
        ),
        (  # labels 0: human_ref_B preferred
            SHP_HISTORIES[1] + "\n\n",
            "Yes. Gravity pulls harder on the hammer, but the hammer also needs more force to speed "
            "up; the two cancel, so without air both accelerate equally.",
            "Yes, Apollo 15 did it on camera.",
        ),
        (
            SHP_HISTORIES[2] + "\n\n",
            "Air pressure in the cabin changes as you climb or descend. The tube behind your ear "
            "opens when you swallow and evens out the pressure, which you feel as a pop.",
            "Planes are loud.",
        ),
    ],
    "tldr": [
        (  # choice 0
            TLDR_PROMPTS[0],
            " Best friend cancels every plan at the last minute but goes out with others. How do I "
            "bring it up without ending the friendship?",
            " my friend is busy with work",
        ),
        (  # choice 1
            TLDR_PROMPTS[1],
            " Got a $5k bonus, $6k left on a 4% car loan and only $2k saved. Pay the loan down or "
            "build an emergency fund first?",
            " Pay off car",
        ),
        (  # news row: no post, the article; summaries without a leading space get one
            TLDR_PROMPTS[2],
            " Marsh End library reopened after eight months of flood repairs; volunteers saved the "
            "local history collection.",
            " A library opened.",
        ),
    ],
    "ultrafeedback": [
        (
            f"<|user|>\n{UF_PROMPTS[0]}<|end|>\n<|assistant|>\n",
            "Cold rain on red leaves\nthe gutter hums a low song\nsummer washes out<|end|>\n",
            "Autumn rain is wet.<|end|>\n",
        ),
        (
            f"<|user|>\n{UF_PROMPTS[1]}<|end|>\n<|assistant|>\n",
            "Lists are mutable: you can add, remove or change items. Tuples are immutable, so they "
            "can be dictionary keys and signal that the data should not change.<|end|>\n",
            "They are the same thing with different brackets.<|end|>\n",
        ),
        (
            f"<|user|>\n{UF_PROMPTS[2]}<|end|>\n<|assistant|>\n",
            "1. Research the company. 2. Prepare two or three stories that show your skills. 3. Ask "
            "questions about the team at the end.<|end|>\n",
            "Dress nicely.<|end|>\n",
        ),
    ],
}


def chat(user: str) -> str:
    """The tiny policy's chat-template rendering of one user turn, generation prompt added."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n"


# Per fixture row: (policy prompt text, what the reward model scores in its place: None for the
# text itself, else the plain string it was trained on, messages or None).
RL_PROMPTS: dict[str, list[tuple[str, str | None, list | None]]] = {
    "hh-rlhf": [(chat(p.strip()), p, None) for p in HH_PROMPTS],
    "shp": [(chat(h), h + "\n\n", None) for h in SHP_HISTORIES],
    "tldr": [(chat(p), p, None) for p in TLDR_PROMPTS],
    "ultrafeedback": [(chat(p), None, [{"role": "user", "content": p}]) for p in UF_PROMPTS],
}

# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Keep load_dataset's cache out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny offline tokenizer (chat template ``<|role|>\\ncontent<|end|>\\n``) and an untrained
    tiny GPT-2 with room for the fixtures' longest texts (no pretraining: nothing here learns)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "gpt2", pretrain_steps=0, max_positions=1024)


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Any:
    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def reward_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sequence classifier standing in for the recipe's exported reward model."""
    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    tokenizer = load_tokenizer(str(tiny_dir))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def data_args(config: str, fixture: Path) -> dict[str, Any]:
    """The config's data ``init_args`` with the fixture file as both of its splits."""
    init = yaml.safe_load((REPO / "configs" / config).read_text())["data"]["init_args"]
    args = {key: value for key, value in init.items() if key not in HUB_LOCATION}
    splits = {init["train_split"]: str(fixture), init["val_split"]: str(fixture)}
    return {**args, "path": "json", "data_files": splits}


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def write_rows(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def kinds(feature: Any) -> Any:
    """A feature's column names, nesting and value kinds (string / int / float)."""
    if isinstance(feature, dict):
        return {name: kinds(sub) for name, sub in feature.items()}
    if hasattr(feature, "feature"):  # List
        return [kinds(feature.feature)]
    return feature.dtype.rstrip("0123456789")


def rollout_dm(
    config: str, fixture: Path, reward_dir: Path, tok_dir: Path, **kwargs: Any
) -> RolloutDataModule:
    dm = RolloutDataModule(
        **{**data_args(config, fixture), "reward_model": str(reward_dir), "tokenizer": str(tok_dir), **kwargs}
    )
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", DATASETS)
def test_fixture_has_the_hub_schema(name: str) -> None:
    loaded = datasets.load_dataset("json", data_files={"train": str(FIXTURES / f"{name}.jsonl")})
    assert kinds(loaded["train"].features) == SCHEMAS[name]
    assert len(loaded["train"]) == 3


@pytest.mark.parametrize("name", DATASETS)
def test_reward_config_examples(name: str, tok: Any, tiny_dir: Path) -> None:
    args = data_args(f"{name}/reward.yaml", FIXTURES / f"{name}.jsonl")
    dm = PreferenceDataModule(**{**args, "tokenizer": str(tiny_dir)})
    dm.setup("fit")
    assert dm.num_dropped == {"train": 0, "val": 0}
    for key in ("train", "val"):
        encoded = dm.datasets[key]
        assert len(encoded) == len(REWARD_EXAMPLES[name])
        for example, (prompt, chosen, rejected) in zip(encoded, REWARD_EXAMPLES[name], strict=True):
            cut = len(tok(prompt)["input_ids"])
            for column, reply in (("chosen", chosen), ("rejected", rejected)):
                ids = example[f"{column}_input_ids"]
                assert tok.decode(ids[:cut]) == prompt
                assert tok.decode(ids[cut:]) == reply
                assert ids == tok(prompt)["input_ids"] + tok(reply, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", DATASETS)
def test_rl_config_prompts(name: str, reward_dir: Path, tiny_dir: Path) -> None:
    dm = rollout_dm(f"{name}/rl.yaml", FIXTURES / f"{name}.jsonl", reward_dir, tiny_dir)
    assert dm.prompts_per_rollout * dm.samples_per_prompt == 128
    for key in ("train", "val"):
        got = [(p.text, p.reward_text, p.messages) for p in dm.prompts[key]]
        assert got == RL_PROMPTS[name]
        assert not any(p.truncated for p in dm.prompts[key])


@pytest.mark.parametrize("name", DATASETS)
def test_rl_config_reads_its_reward_config_export(name: str) -> None:
    reward, rl = (
        yaml.safe_load((REPO / "configs" / name / f).read_text()) for f in ("reward.yaml", "rl.yaml")
    )
    exports = [c for c in reward["trainer"]["callbacks"] if c["class_path"].endswith("ExportPretrained")]
    assert rl["data"]["init_args"]["reward_model"] == exports[0]["init_args"]["dirpath"] + "/adapter"
    base = reward["model"]["init_args"]["model"]["name_or_path"]
    assert base == rl["model"]["init_args"]["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert rl["model"]["init_args"]["algorithm"] == "reinforce"
    assert rl["model"]["init_args"]["kl"]["coef"] == 0.05
    assert rl["data"]["init_args"]["temperature"] == 0.7
    assert reward["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1.0e-4
    assert rl["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1.0e-5
    for config in (reward, rl):
        assert config["model"]["init_args"]["model"]["lora"]["r"] == 8
        assert config["trainer"]["precision"] == "bf16-mixed"
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == "checkpoints"


def test_chat_wrapped_prompts_are_scored_on_the_plain_text(
    reward_dir: Path, tiny_dir: Path, tok: Any
) -> None:
    """TL;DR: the policy samples after its chat template; the reward model scores the plain
    "…TL;DR:" prompt + " " + summary, the text it was trained on."""
    dm = rollout_dm(
        "tldr/rl.yaml",
        FIXTURES / "tldr.jsonl",
        reward_dir,
        tiny_dir,
        prompts_per_rollout=3,
        reward_dtype="float32",
    )
    summary = tok("Short summary.", add_special_tokens=False)["input_ids"]

    def generate(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = torch.full((prompt_ids.shape[0], kwargs["max_new_tokens"]), tok.pad_token_id)
        out[:, : len(summary)] = torch.tensor(summary)
        out[:, len(summary)] = tok.eos_token_id
        return out

    policy = SimpleNamespace(device=torch.device("cpu"), tokenizer_name_or_path=str(tiny_dir))
    policy.generate = generate
    dm.trainer = SimpleNamespace(lightning_module=policy)
    batch = next(iter(dm.train_dataloader()))
    assert batch["responses"] == ["Short summary."] * 3
    plain = {chat(p): p for p in TLDR_PROMPTS}
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        expected = [
            model(**tok(plain[text] + " Short summary.", return_tensors="pt")).logits[0, 0]
            for text in batch["prompts"]
        ]
    assert torch.allclose(batch["raw_scores"], torch.stack(expected), atol=1e-5)


# ----------------------------------------------------------------- tldr format: row errors


def _set(column: str, **fields: Any) -> Any:
    return lambda row: row[column].update(fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda row: row.update(choice=2), r"column 'choice' has value 2; allowed values are 0 and 1"),
        (_set("info", post=None, article=None), r"column 'info' has neither a 'post'"),
        (_set("info", subreddit=None), r"column 'info' field 'subreddit' is null"),
        (lambda row: row["summaries"].append(row["summaries"][0]), r"column 'summaries' holds 3 entries"),
    ],
    ids=["choice", "no-text", "no-subreddit", "three-summaries"],
)
def test_tldr_row_errors_name_the_row_and_column(
    change: Any, match: str, tmp_path: Path, tiny_dir: Path
) -> None:
    records = rows("tldr")
    change(records[1])
    path = write_rows(tmp_path / "tldr-bad.jsonl", records)
    dm = PreferenceDataModule(
        path="json",
        data_files={"train": str(path), "validation": str(path)},
        val_split="validation",
        format="tldr",
        tokenizer=str(tiny_dir),
    )
    with pytest.raises(ValueError, match=r"tldr-bad.jsonl\[train\] row 1: " + match):
        dm.setup("fit")


def test_tldr_row_errors_in_rl_prompts(tmp_path: Path, reward_dir: Path, tiny_dir: Path) -> None:
    records = rows("tldr")
    records[2]["info"]["article"] = "  "
    path = write_rows(tmp_path / "tldr-bad.jsonl", records)
    with pytest.raises(ValueError, match=r"tldr-bad.jsonl\[train\] row 2: column 'info' has neither"):
        rollout_dm("tldr/rl.yaml", path, reward_dir, tiny_dir)


def test_tldr_example_validation() -> None:
    row = rows("tldr")[0]
    assert tldr_example(row)["chosen"] == REWARD_EXAMPLES["tldr"][0][1]
    for choice in (True, -1, "0", 1.0):
        with pytest.raises(RowError, match="column 'choice'") as err:
            tldr_example({**row, "choice": choice})
        assert err.value.column == "choice"
    with pytest.raises(RowError, match="column 'info' is null"):
        tldr_example({**row, "info": None})
    same = [row["summaries"][0], {**row["summaries"][1], "text": row["summaries"][0]["text"]}]
    with pytest.raises(RowError, match="two identical texts"):
        tldr_example({**row, "summaries": same})
    with pytest.raises(RowError, match="column 'summaries' is empty"):
        tldr_example({**row, "summaries": [row["summaries"][0], {"text": " ", "policy": "ref"}]})


def test_detect_format_knows_the_comparisons_schema() -> None:
    columns = ["info", "summaries", "choice", "worker", "batch", "split", "extra"]
    assert detect_format(columns, False) == "tldr"


# ------------------------------------------------- conversational: UltraFeedback string prompt


def test_string_prompt_repeating_the_user_turn_is_ignored(tok: Any) -> None:
    row = rows("ultrafeedback")[0]
    example = conversational_example(row, tok)
    assert example["prompt"] == chat(UF_PROMPTS[0])
    assert prompt_messages(row) == [{"content": UF_PROMPTS[0], "role": "user"}]
    # Ignored even when it differs: the messages are the conversation.
    assert conversational_example({**row, "prompt": "something else"}, tok) == example


def test_string_prompt_without_a_user_turn_becomes_one(tok: Any) -> None:
    reply = [{"role": "assistant", "content": "Fine, thanks."}]
    other = [{"role": "assistant", "content": "No."}]
    row = {"prompt": "How are you?", "chosen": reply, "rejected": other}
    example = conversational_example(row, tok)
    assert example == {
        "prompt": chat("How are you?"),
        "chosen": "Fine, thanks.<|end|>\n",
        "rejected": "No.<|end|>\n",
    }
    system = {"role": "system", "content": "Be brief."}
    with_system = {"prompt": "How are you?", "chosen": [system, *reply], "rejected": [system, *other]}
    assert conversational_example(with_system, tok)["prompt"] == (
        "<|system|>\nBe brief.<|end|>\n" + chat("How are you?")
    )
    assert prompt_messages({"prompt": "How are you?", "chosen": []}) == [
        {"role": "user", "content": "How are you?"}
    ]
    for empty in ("", "  ", None):
        with pytest.raises(RowError, match="column 'prompt' is (empty|null) and column 'chosen' has no user"):
            conversational_example({**row, "prompt": empty}, tok)


def test_string_prompt_column_through_the_datamodule(tmp_path: Path, tok: Any, tiny_dir: Path) -> None:
    records = [
        {
            "prompt": "Name a colour.",
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Dog."}],
        },
    ] * 2
    path = write_rows(tmp_path / "uf.jsonl", records)
    dm = PreferenceDataModule(path=str(path), val_fraction=0.5, tokenizer=str(tiny_dir))
    dm.setup("fit")
    assert dm.format == "conversational"
    ids = dm.datasets["train"][0]["chosen_input_ids"]
    assert tok.decode(ids) == chat("Name a colour.") + "Red.<|end|>\n"


# ------------------------------------------------------------------------ prompt_of, options


def test_prompt_of_needs_only_the_prompt_columns(tok: Any) -> None:
    same = H + "Hi." + A + " Hello."
    assert prompt_of("implicit", {"chosen": same, "rejected": same}) == H + "Hi." + A
    assert prompt_of("explicit", {"prompt": "Q:", "chosen": "", "rejected": ""}) == "Q:"
    assert prompt_of("scored", {"history": "Post"}) == "Post\n\n"
    assert prompt_of("tldr", rows("tldr")[2]) == TLDR_PROMPTS[2]
    assert prompt_of("conversational", rows("ultrafeedback")[1], tok) == chat(UF_PROMPTS[1])
    with pytest.raises(ValueError, match="format must be one of"):
        prompt_of("classifier", {})


def test_rollout_format_options_are_checked() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        RolloutDataModule("json", "reward", format="classifier")
    with pytest.raises(ValueError, match="prompt_column"):
        RolloutDataModule("json", "reward", columns={"prompt": "question"})
    with pytest.raises(ValueError, match="columns=.*<column>"):
        RolloutDataModule("json", "reward", format="explicit", prompt_column="question")
    with pytest.raises(ValueError, match="not canonical"):
        RolloutDataModule("json", "reward", format="explicit", columns={"question": "prompt"})


def test_rollout_columns_mapping_and_missing_columns(
    tmp_path: Path, reward_dir: Path, tiny_dir: Path
) -> None:
    path = write_rows(
        tmp_path / "odd.jsonl", [{"question": f"Q{i}?", "good": " a", "bad": " b"} for i in range(4)]
    )
    files = {"train": str(path), "test": str(path)}
    common = {"reward_model": str(reward_dir), "tokenizer": str(tiny_dir), "data_files": files}
    dm = RolloutDataModule(
        "json",
        format="explicit",
        columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
        **common,
    )
    dm.setup("fit")
    assert [p.text for p in dm.prompts["train"]] == ["Q0?", "Q1?", "Q2?", "Q3?"]
    with pytest.raises(
        ValueError, match=r"format 'explicit' needs column 'prompt'.*\['question', 'good', 'bad'\]"
    ):
        RolloutDataModule("json", format="explicit", **common).setup("fit")
