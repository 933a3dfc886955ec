"""Tests for PreferenceDataModule: every format through load_dataset, batches, truncation, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from tokenizers import processors

from perlhf.data import synthetic
from perlhf.data.formats import classifier_example, detect_format, implicit_example
from perlhf.data.preference import PreferenceDataModule
from perlhf.models import load_tokenizer
from perlhf.tiny import EOS, build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "preference"
H, A = "\n\nHuman: ", "\n\nAssistant:"
PAD = 1


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Keep load_dataset's cache out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tok(tok_dir: str) -> Any:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def bos_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny tokenizer, but adding a BOS token like Llama's."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tokenizer.convert_tokens_to_ids(EOS))]
    )
    path = tmp_path_factory.mktemp("bos_tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_dm(path: Path | str, tokenizer: str, stage: str = "fit", **kwargs: Any) -> PreferenceDataModule:
    """``path`` with ``data_files`` given means that builder's files (``same_split``)."""
    if "data_files" in kwargs and Path(path).is_file():
        path = {".csv": "csv"}.get(Path(path).suffix, "json")
    dm = PreferenceDataModule(path=str(path), tokenizer=tokenizer, **kwargs)
    dm.setup(stage)
    return dm


def same_split(path: Path) -> dict[str, Any]:
    """Train and val are both the whole file, in file order."""
    return {"data_files": {"train": str(path), "test": str(path)}}


def ids(tok: Any, prompt: str, response: str) -> list[int]:
    return tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]


def check_right_padded(batch: dict[str, torch.Tensor], expected: list[list[int]]) -> None:
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape == (len(expected), max(len(e) for e in expected))
    for row, mask, want in zip(batch["input_ids"], batch["attention_mask"], expected, strict=True):
        n = len(want)
        assert row[:n].tolist() == want
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert row[n:].eq(PAD).all()


def pair(prompt: str, chosen: str | None, rejected: str | None) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def chat(*turns: str) -> list[dict]:
    roles = ("user", "assistant") * len(turns)
    return [{"role": roles[i], "content": content} for i, content in enumerate(turns)]


def explicit_rows(n: int = 3) -> list[dict]:
    return [
        {"prompt": f"Name some colours {i}:", "chosen": " red blue", "rejected": " cat"} for i in range(n)
    ]


def test_hh_implicit_splits_at_last_marker_of_common_prefix(tok: Any, tok_dir: str) -> None:
    dm = make_dm(FIXTURES / "hh.jsonl", tok_dir, **same_split(FIXTURES / "hh.jsonl"))
    assert dm.format == "implicit" and dm.is_pairwise
    rows = [json.loads(line) for line in (FIXTURES / "hh.jsonl").read_text().splitlines()]
    multi_turn = implicit_example(rows[0], A)
    assert multi_turn["prompt"] == f"{H}Name some colours.{A} Red, blue and green.{H}Any more?{A}"
    assert (multi_turn["chosen"], multi_turn["rejected"]) == (" Yellow and purple.", " No.")
    # The replies share " Sure: ", but the split is at the marker, not the end of the common prefix.
    shared_start = implicit_example(rows[1], A)
    assert shared_start["prompt"] == H + "Name some animals." + A
    assert shared_start["chosen"] == " Sure: cat, dog and horse."
    for i, row in enumerate(rows):
        parts = implicit_example(row, A)
        example = dm.datasets["val"][i]
        assert example["chosen_input_ids"] == ids(tok, parts["prompt"], parts["chosen"])
        assert example["rejected_input_ids"] == ids(tok, parts["prompt"], parts["rejected"])
        assert tok.decode(example["chosen_input_ids"]) == row["chosen"]


def test_shp_label_zero_swaps_a_and_b(tok: Any, tok_dir: str) -> None:
    dm = make_dm(FIXTURES / "shp.jsonl", tok_dir, **same_split(FIXTURES / "shp.jsonl"))
    assert dm.format == "scored"
    val = dm.datasets["val"]
    assert val[0]["chosen_input_ids"] == ids(tok, "Name some colours please\n\n", "red blue green")  # label 1
    assert val[1]["chosen_input_ids"] == ids(tok, "Name some animals please\n\n", "cat dog horse")  # label 0
    assert val[1]["rejected_input_ids"] == ids(tok, "Name some animals please\n\n", "apple pear")
    assert "margin" not in next(iter(dm.val_dataloader()))


def test_conversational_renders_with_chat_template(tok: Any, tok_dir: str) -> None:
    dm = make_dm(FIXTURES / "conversational.jsonl", tok_dir, **same_split(FIXTURES / "conversational.jsonl"))
    assert dm.format == "conversational"
    val = dm.datasets["val"]
    prompt = "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nName some colours:<|end|>\n<|assistant|>\n"
    assert val[0]["chosen_input_ids"] == ids(tok, prompt, "red blue<|end|>\n")
    assert val[0]["rejected_input_ids"] == ids(tok, prompt, "cat<|end|>\n")
    multi_turn = (
        "<|user|>\nName some animals:<|end|>\n<|assistant|>\ncat dog<|end|>\n"
        "<|user|>\nMore?<|end|>\n<|assistant|>\nhorse<|end|>\n"
    )
    assert tok.decode(val[1]["chosen_input_ids"]) == multi_turn


def test_conversational_with_prompt_column(tmp_path: Path, tok: Any, tok_dir: str) -> None:
    row = {
        "prompt": [{"role": "user", "content": "Name some tools:"}],
        "chosen": [{"role": "assistant", "content": "saw"}],
        "rejected": [{"role": "assistant", "content": "red"}],
    }
    path = write_jsonl(tmp_path / "trl.jsonl", [row, row])
    dm = make_dm(path, tok_dir, **same_split(path))
    assert dm.format == "conversational"
    prompt = "<|user|>\nName some tools:<|end|>\n<|assistant|>\n"
    assert dm.datasets["train"][0]["chosen_input_ids"] == ids(tok, prompt, "saw<|end|>\n")


def test_conversational_needs_a_chat_template(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="chat template"):
        make_dm(FIXTURES / "conversational.jsonl", str(tmp_path / "plain"))


def test_classifier_labels_and_batch(tok: Any, tok_dir: str) -> None:
    path = FIXTURES / "classifier.jsonl"
    dm = make_dm(path, tok_dir, eval_batch_size=4, **same_split(path))
    assert dm.format == "classifier" and not dm.is_pairwise
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]
    check_right_padded(
        batch,
        [
            ids(tok, "Name some colours please", " red blue"),
            ids(tok, "Name some colours please", " cat"),
            ids(tok, "Name some animals please", " dog"),
            ids(tok, "Name some animals please", " plum"),
        ],
    )


@pytest.mark.parametrize("labels", [[1, 0], [True, False], [1.0, 0.0]])
def test_classifier_numeric_and_bool_labels(tmp_path: Path, tok_dir: str, labels: list) -> None:
    rows = [{"prompt": "p", "response": f" r{i}", "label": label} for i, label in enumerate(labels)]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    dm = make_dm(path, tok_dir, **same_split(path))
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [1.0, 0.0]


def test_classifier_label_forms() -> None:
    for label, want in [(1, 1.0), (0, 0.0), (True, 1.0), (False, 0.0), ("good", 1.0), (" Bad ", 0.0)]:
        assert classifier_example({"prompt": "", "response": "x", "label": label})["label"] == want
    with pytest.raises(ValueError, match="'label'.*'good'/'bad'"):
        classifier_example({"prompt": "", "response": "x", "label": 2})


def test_explicit_csv_batch_is_chosen_then_rejected(tok: Any, tok_dir: str) -> None:
    path = FIXTURES / "explicit.csv"
    dm = make_dm(path, tok_dir, eval_batch_size=3, **same_split(path))
    assert dm.format == "explicit"
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "prompt_lengths", "margin"}
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [3.0, 2.5, 4.0]
    prompts = ["Name some colours:", "Name some animals:", "Name some fruits:"]
    assert batch["prompt_lengths"].tolist() == [len(tok(p)["input_ids"]) for p in prompts]
    chosen = [
        ids(tok, "Name some colours:", " red blue green"),
        ids(tok, "Name some animals:", " cat dog"),
        ids(tok, "Name some fruits:", " apple pear plum"),
    ]
    rejected = [
        ids(tok, "Name some colours:", " cat dog"),
        ids(tok, "Name some animals:", " apple"),
        ids(tok, "Name some fruits:", " saw saw"),
    ]
    check_right_padded(batch, chosen + rejected)  # rows [:B] chosen, [B:] rejected, one length L
    test_batch = next(iter(dm.test_dataloader()))
    assert torch.equal(test_batch["input_ids"], next(iter(dm.predict_dataloader()))["input_ids"])


def test_parquet_with_mapped_margin_and_carved_val(tmp_path: Path, tok_dir: str) -> None:
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(list(synthetic.preference_pairs(40))).to_parquet(path)
    kwargs = {"columns": {"margin": "gold_margin"}, "val_fraction": 0.25, "batch_size": 4}
    dm = make_dm(path, tok_dir, **kwargs)
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (30, 10)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["margin"].shape == (4,)
    again = make_dm(path, tok_dir, **kwargs)
    assert dm.datasets["val"]["chosen_input_ids"] == again.datasets["val"]["chosen_input_ids"]
    assert torch.equal(batch["input_ids"], next(iter(again.train_dataloader()))["input_ids"])
    other = make_dm(path, tok_dir, seed=1, **kwargs)
    assert dm.datasets["val"]["chosen_input_ids"] != other.datasets["val"]["chosen_input_ids"]


def test_folder_with_validation_split_and_sample_limits(tmp_path: Path, tok_dir: str) -> None:
    folder = synthetic.write_preference_data(tmp_path / "data", n_train=20, n_val=6)
    dm = make_dm(folder, tok_dir, val_split="validation", max_train_samples=8, max_val_samples=4)
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (8, 4)
    assert dm.num_dropped == {"train": 0, "val": 0}


def test_prompt_is_cut_from_the_left(tmp_path: Path, tok: Any, tok_dir: str) -> None:
    prompt = "Name some colours: " + " ".join(["red blue green yellow"] * 10)
    row = {"prompt": prompt, "chosen": " red blue", "rejected": " cat dog horse mouse"}
    path = write_jsonl(tmp_path / "long.jsonl", [row, row])
    example = make_dm(path, tok_dir, max_length=16, **same_split(path)).datasets["val"][0]
    full = tok(prompt)["input_ids"]
    chosen = tok(" red blue", add_special_tokens=False)["input_ids"]
    rejected = tok(" cat dog horse mouse", add_special_tokens=False)["input_ids"]
    budget = 16 - len(rejected)  # the same prompt cut for both, sized by the longer response
    assert example["chosen_input_ids"] == full[-budget:] + chosen
    assert example["rejected_input_ids"] == full[-budget:] + rejected
    assert len(example["rejected_input_ids"]) == 16


def test_left_cut_keeps_bos(tmp_path: Path, bos_tok_dir: str) -> None:
    tok = load_tokenizer(bos_tok_dir)
    bos = tok.bos_token_id
    prompt = " ".join(["red blue green yellow"] * 10)
    path = write_jsonl(tmp_path / "long.jsonl", [pair(prompt, " red", " cat")] * 2)
    example = make_dm(path, bos_tok_dir, max_length=10, **same_split(path)).datasets["val"][0]
    full = tok(prompt)["input_ids"]
    assert full[0] == bos and full[1] != bos
    response = tok(" red", add_special_tokens=False)["input_ids"]
    assert example["chosen_input_ids"] == [bos] + full[-(9 - len(response)) :] + response
    # A prompt whose text already starts with BOS (e.g. from a chat template) gets no second one.
    path = write_jsonl(tmp_path / "bos.jsonl", [pair(EOS + "Hi", " red", " cat")] * 2)
    example = make_dm(path, bos_tok_dir, **same_split(path)).datasets["val"][0]
    assert example["chosen_input_ids"][:2] == [bos, tok("Hi", add_special_tokens=False)["input_ids"][0]]


def overlong_file(tmp_path: Path) -> Path:
    rows = explicit_rows()
    rows[1]["chosen"] = " red" * 40
    return write_jsonl(tmp_path / "overlong.jsonl", rows)


def test_overlong_drop_counts_rows(tmp_path: Path, tok_dir: str) -> None:
    path = overlong_file(tmp_path)
    dm = make_dm(path, tok_dir, max_length=24, **same_split(path))
    assert dm.num_dropped == {"train": 1, "val": 1}
    assert len(dm.datasets["train"]) == 2


def test_overlong_error_names_the_row(tmp_path: Path, tok_dir: str) -> None:
    path = overlong_file(tmp_path)
    with pytest.raises(ValueError, match=r"\[train\] row 1: column 'chosen'.*max_length=24"):
        make_dm(path, tok_dir, max_length=24, overlong="error", **same_split(path))


def test_overlong_truncate_cuts_the_response(tmp_path: Path, tok: Any, tok_dir: str) -> None:
    path = overlong_file(tmp_path)
    dm = make_dm(path, tok_dir, max_length=24, overlong="truncate", **same_split(path))
    assert dm.num_dropped == {"train": 0, "val": 0}
    assert dm.num_truncated == {"train": 1, "val": 1}
    example = dm.datasets["val"][1]
    response = tok(" red" * 40, add_special_tokens=False)["input_ids"]
    prompt = tok("Name some colours 1:")["input_ids"]
    assert example["chosen_input_ids"] == prompt[-1:] + response[:23]
    assert example["rejected_input_ids"] == prompt[-1:] + tok(" cat", add_special_tokens=False)["input_ids"]


def test_truncation_that_makes_a_pair_identical_drops_it_and_counts(
    tmp_path: Path, tok: Any, tok_dir: str
) -> None:
    shared = " red" * 40
    rows = [*explicit_rows(2), pair("p", shared + " cat", shared + " dog"), pair("p", shared, " cat")]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = make_dm(path, tok_dir, max_length=24, overlong="truncate", **same_split(path))
    assert len(dm.datasets["train"]) == 3, "the pair cut to chosen == rejected is dropped"
    assert all(e["chosen_input_ids"] != e["rejected_input_ids"] for e in dm.datasets["train"])
    assert dm.num_dropped["train"] == 1 and dm.num_truncated["train"] == 1


@pytest.mark.parametrize(
    ("rows", "kwargs", "column", "row"),
    [
        ([*explicit_rows(2), pair("p", "  ", " cat")], {}, "chosen", 2),
        ([*explicit_rows(1), pair("p", " x", None)], {}, "rejected", 1),
        ([*explicit_rows(1), pair("p", " x", " x")], {}, "chosen", 1),
        ([{"prompt": "p", "response": " r", "label": s} for s in ("good", "maybe")], {}, "label", 1),
        (
            [{"chosen": f"{H}hi{A} a", "rejected": f"{H}hi{A} b"}, {"chosen": "a b", "rejected": "a c"}],
            {},
            "chosen",
            1,
        ),
        (
            [{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": n} for n in (1, 2)],
            {},
            "labels",
            1,
        ),
        ([{"chosen": chat("q", "a"), "rejected": chat("Q", "b")}], {}, "chosen", 0),
        (
            [{"q": "p", "good": " a", "bad": " b"}, {"q": "p", "good": "", "bad": " b"}],
            {"columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
            "chosen",
            1,
        ),
    ],
    ids=["empty", "null", "identical", "bad-label", "no-marker", "bad-shp-label", "conv-prefix", "mapped"],
)
def test_row_errors_name_dataset_split_column_and_row(
    tmp_path: Path, tok_dir: str, rows: list[dict], kwargs: dict, column: str, row: int
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        make_dm(path, tok_dir, **same_split(path), **kwargs)
    message = str(err.value)
    assert message.startswith(f"{path}[train] row {row}: column '{column}'"), message


def test_row_error_after_val_carving_names_the_original_row(tmp_path: Path, tok_dir: str) -> None:
    rows = explicit_rows(10)
    rows[7]["chosen"] = ""
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"\[train\] row 7: column 'chosen' is empty"):
        make_dm(path, tok_dir, val_fraction=0.3)


def test_missing_column_for_the_chosen_format(tok_dir: str) -> None:
    match = r"needs column 'prompt'.*\['chosen', 'rejected'\].*columns=\{'prompt'"
    with pytest.raises(ValueError, match=match):
        make_dm(FIXTURES / "hh.jsonl", tok_dir, format="explicit")


def test_unknown_columns_list_what_was_found(tmp_path: Path, tok: Any, tok_dir: str) -> None:
    rows = [{"question": "Name some colours:", "good": " red", "bad": " cat"}] * 2
    path = write_jsonl(tmp_path / "odd.jsonl", rows)
    with pytest.raises(ValueError, match=r"\['question', 'good', 'bad'\].*columns=.*format="):
        make_dm(path, tok_dir)
    with pytest.raises(ValueError, match=r"columns=\{'chosen': 'better'\} names a missing column"):
        make_dm(path, tok_dir, columns={"prompt": "question", "chosen": "better", "rejected": "bad"})
    with pytest.raises(ValueError, match="not canonical"):
        PreferenceDataModule(path=str(path), columns={"question": "prompt"})
    dm = make_dm(path, tok_dir, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert dm.format == "explicit"
    assert dm.datasets["val"][0]["chosen_input_ids"] == ids(tok, "Name some colours:", " red")


def test_detect_format_order() -> None:
    assert detect_format(["prompt", "response", "label", "chosen"], False) == "classifier"
    assert detect_format(["history", "human_ref_A", "human_ref_B", "labels"], False) == "scored"
    assert detect_format(["prompt", "chosen", "rejected"], True) == "conversational"
    assert detect_format(["prompt", "chosen", "rejected"], False) == "explicit"
    assert detect_format(["chosen", "rejected"], False) == "implicit"
    assert detect_format(["text"], False) is None


def test_tokenizer_from_the_attached_module(tok_dir: str) -> None:
    path = FIXTURES / "explicit.csv"
    dm = PreferenceDataModule(path="csv", **same_split(path))
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.is_pairwise
    with pytest.raises(ValueError, match="tokenizer=.*tokenizer_name_or_path"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer_name_or_path=tok_dir))
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == PAD and len(dm.datasets["train"]) == 4


def test_validate_stage_prepares_val_only(tok_dir: str) -> None:
    dm = make_dm(FIXTURES / "explicit.csv", tok_dir, stage="validate")
    assert set(dm.datasets) == {"val"}
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_load_errors_name_the_path(tmp_path: Path, tok_dir: str) -> None:
    text = tmp_path / "pairs.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="pairs.txt.*unsupported file type"):
        make_dm(text, tok_dir)
    with pytest.raises(ValueError, match="could not load preference dataset path='json'"):
        make_dm("json", tok_dir, data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="no split 'dev'"):
        make_dm(FIXTURES / "hh.jsonl", tok_dir, train_split="dev")
