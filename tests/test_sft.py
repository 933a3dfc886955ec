"""SFT: labels mask exactly what is not trained, length limits and row errors, LoRA/full training
improves the task's gold score, exports reload with plain transformers + peft, exact resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer as trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from tokenizers import processors
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from perlhf.data import SFTDataModule, synthetic
from perlhf.data.rollout_utils import encode
from perlhf.data.sft import SFTCollator
from perlhf.models import LoraSpec, ModelConfig, load_tokenizer
from perlhf.modules import SFTModule
from perlhf.tiny import EOS, build_tiny_tokenizer

EOS_ID, PAD_ID, IGNORE = 0, 1, -100


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Keep load_dataset's cache out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demonstrations of the built-in task: train.jsonl and a held-out test.jsonl."""
    root = tmp_path_factory.mktemp("demos")
    synthetic.write_jsonl(synthetic.demonstrations(2000, seed=0), root / "train.jsonl")
    synthetic.write_jsonl(synthetic.demonstrations(200, seed=1), root / "test.jsonl")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_dm(path: Path, tokenizer: Any, stage: str = "fit", **kwargs: Any) -> SFTDataModule:
    """Train and val are both the whole file, in file order. ``tokenizer``: a path or an object."""
    name = tokenizer if isinstance(tokenizer, str) else None
    files = {"train": str(path), "test": str(path)}
    dm = SFTDataModule(path="json", data_files=files, tokenizer=name, **kwargs)
    if name is None:
        dm.tokenizer = tokenizer
    dm.setup(stage)
    return dm


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def runs(labels: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``[start, end)`` spans of trained and of untrained positions."""
    spans: tuple[list, list] = ([], [])
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
            spans[int(labels[start] == IGNORE)].append((start, i))
            start = i
    return spans


# --- data -----------------------------------------------------------------------------------------


def test_prompt_completion_masks_prompt_and_padding(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    rows = [
        {"prompt": "Name some colours:", "completion": " red blue green"},
        {"prompt": "Name some tools:", "completion": " saw"},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    dm = make_dm(path, str(tiny_model_dir))
    assert dm.format == "prompt_completion"
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(rows):
        prompt, completion = ids(tok, row["prompt"]), ids(tok, row["completion"]) + [EOS_ID]
        n = len(prompt) + len(completion)
        assert batch["input_ids"][i, :n].tolist() == prompt + completion
        assert batch["labels"][i].tolist() == [IGNORE] * len(prompt) + completion + [IGNORE] * (
            batch["labels"].shape[1] - n
        )
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert batch["input_ids"][i, n:].eq(PAD_ID).all()
    assert batch["input_ids"].shape[1] == max(len(e["input_ids"]) for e in dm.datasets["val"])

    everything = make_dm(path, str(tiny_model_dir), completion_only_loss=False, add_eos=False)
    example = everything.datasets["val"][0]
    assert example["input_ids"][-1] != EOS_ID
    assert example["labels"] == example["input_ids"]


def chat_row() -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name some colours:"},
            {"role": "assistant", "content": "red blue"},
            {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "green"},
        ]
    }


def test_conversational_trains_only_assistant_turns(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    row = chat_row()
    path = write_jsonl(tmp_path / "chat.jsonl", [row, row])
    example = make_dm(path, str(tiny_model_dir)).datasets["val"][0]
    input_ids, labels = example["input_ids"], example["labels"]
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(input_ids) == rendered + EOS
    trained, untrained = runs(labels)
    assert [tok.decode(input_ids[a:b]) for a, b in trained] == ["red blue<|end|>\n", "green<|end|>\n" + EOS]
    assert [tok.decode(input_ids[a:b]) for a, b in untrained] == [
        "<|system|>\nBe brief.<|end|>\n<|user|>\nName some colours:<|end|>\n<|assistant|>\n",
        "<|user|>\nMore?<|end|>\n<|assistant|>\n",
    ]
    assert all(labels[i] == input_ids[i] for a, b in trained for i in range(a, b))
    # The first assistant turn starts where generation after the generation prompt would start.
    prompt = tok.apply_chat_template(row["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert input_ids[: trained[0][0]] == encode(tok, prompt)

    everything = make_dm(path, str(tiny_model_dir), completion_only_loss=False).datasets["val"][0]
    assert everything["labels"] == everything["input_ids"] == input_ids


def test_conversational_needs_a_chat_template_and_an_assistant_turn(
    tmp_path: Path, tok: Any, tiny_model_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_row()] * 2)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"needs a tokenizer with a chat template.*set tokenizer="):
        make_dm(path, plain)
    no_reply = {"messages": [{"role": "user", "content": "Name some colours:"}]}
    path = write_jsonl(tmp_path / "no_reply.jsonl", [chat_row(), no_reply])
    with pytest.raises(ValueError, match=r"\[train\] row 1: column 'messages' has no .*'assistant'"):
        make_dm(path, str(tiny_model_dir))
    path = write_jsonl(tmp_path / "bad.jsonl", [chat_row(), {"messages": "hello"}])
    with pytest.raises(ValueError, match=r"\[train\] row 1: column 'messages' is not a non-empty list"):
        make_dm(path, str(tiny_model_dir))


def test_text_format_trains_every_token(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "Name some fruits: apple pear"}] * 2)
    dm = make_dm(path, str(tiny_model_dir))
    assert dm.format == "text"
    example = dm.datasets["val"][0]
    assert example["input_ids"] == ids(tok, "Name some fruits: apple pear") + [EOS_ID]
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"messages": chat_row()["messages"], "text": "x"}, None, "conversational"),
        ({"prompt": "Name some colours:", "completion": " red", "text": "x"}, None, "prompt_completion"),
        ({"text": "Name some colours: red"}, None, "text"),
        (
            {"question": "Name some colours:", "answer": " red"},
            {"prompt": "question", "completion": "answer"},
            "prompt_completion",
        ),
    ],
    ids=["messages", "prompt-completion", "text", "mapped"],
)
def test_format_is_detected_from_columns(
    tmp_path: Path, tiny_model_dir: Path, row: dict, columns: dict | None, expected: str
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    assert make_dm(path, str(tiny_model_dir), columns=columns).format == expected


def test_unknown_columns_and_missing_columns_are_explained(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}] * 2)
    with pytest.raises(ValueError, match=r"cannot tell the SFT format from columns \['question', 'answer'\]"):
        make_dm(path, str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"needs column 'completion'.*columns=\{'completion': '<column>'\}"):
        make_dm(path, str(tiny_model_dir), format="prompt_completion", columns={"prompt": "question"})
    with pytest.raises(ValueError, match=r"names a missing column 'response'"):
        make_dm(path, str(tiny_model_dir), columns={"completion": "response"})
    with pytest.raises(ValueError, match=r"not canonical column names"):
        SFTDataModule(path=str(path), columns={"answer": "answer"})


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        (
            [{"prompt": "p", "completion": " a"}, {"prompt": "p", "completion": "  "}],
            None,
            "row 1: column 'completion' is empty; remove the row or map another column with "
            "columns={'completion': ...}",
        ),
        (
            [{"prompt": "p", "completion": " a"}, {"prompt": None, "completion": " a"}],
            None,
            "row 1: column 'prompt' is null, not a string",
        ),
        (
            [{"q": "p", "a": " a"}, {"q": "p", "a": " b"}, {"q": "p", "a": ""}],
            {"prompt": "q", "completion": "a"},
            "row 2: column 'completion' is empty; remove the row or map another column with "
            "columns={'completion': ...} (dataset column 'a')",
        ),
        ([{"text": "a b"}, {"text": 3}], None, "row 1: column 'text' is a int, not a string"),
    ],
    ids=["empty-completion", "null-prompt", "mapped", "text-not-string"],
)
def test_row_errors_name_dataset_split_row_and_column(
    tmp_path: Path, tiny_model_dir: Path, rows: list[dict], columns: dict | None, message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        make_dm(path, str(tiny_model_dir), columns=columns)
    assert str(err.value).startswith(f"{path}[train] {message}"), str(err.value)


def overlong_rows() -> list[dict]:
    rows = [{"prompt": f"Name some colours {i}:", "completion": " red blue"} for i in range(3)]
    rows[2]["completion"] = " red" * 40
    return rows


def test_overlong_drop_error_and_truncate(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", overlong_rows())
    dropped = make_dm(path, str(tiny_model_dir), max_length=24)
    assert dropped.num_dropped == {"train": 1, "val": 1}
    assert len(dropped.datasets["train"]) == 2

    with pytest.raises(ValueError) as err:
        make_dm(path, str(tiny_model_dir), max_length=24, overlong="error")
    assert str(err.value).startswith(f"{path}[train] row 2: column 'completion' is 41 tokens"), str(err.value)
    assert "max_length=24" in str(err.value) and "overlong='drop'" in str(err.value)

    cut = make_dm(path, str(tiny_model_dir), max_length=24, overlong="truncate")
    assert cut.num_dropped == {"train": 0, "val": 0} and cut.num_truncated == {"train": 1, "val": 1}
    example = cut.datasets["val"][2]
    prompt, completion = ids(tok, "Name some colours 2:"), ids(tok, " red" * 40)
    # At least one prompt token stays; the completion is cut on the right, losing its EOS.
    assert example["input_ids"] == prompt[-1:] + completion[:23]
    assert example["labels"] == [IGNORE] + completion[:23]


@pytest.fixture(scope="module")
def bos_tok() -> Any:
    """The tiny tokenizer, but adding a BOS token like Llama's."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tokenizer.convert_tokens_to_ids(EOS))]
    )
    return tokenizer


def test_long_prompt_is_cut_from_the_left_keeping_bos(tmp_path: Path, bos_tok: Any) -> None:
    prompt = "Name some colours: " + " ".join(["red blue green yellow"] * 10)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "completion": " red blue"}] * 2)
    dm = make_dm(path, bos_tok, max_length=16)
    example = dm.datasets["val"][0]
    full, completion = bos_tok(prompt)["input_ids"], ids(bos_tok, " red blue") + [EOS_ID]
    assert full[0] == EOS_ID != full[1]
    kept = 16 - len(completion) - 1
    assert example["input_ids"] == [EOS_ID] + full[-kept:] + completion
    assert example["labels"] == [IGNORE] * (kept + 1) + completion
    assert dm.num_truncated == {"train": 2, "val": 2} and dm.num_dropped == {"train": 0, "val": 0}


# --- training -------------------------------------------------------------------------------------


def sft_module(model_dir: Path, finetune: str = "lora", lr: float = 3e-3) -> SFTModule:
    config = ModelConfig(
        name_or_path=str(model_dir), finetune=finetune, lora=LoraSpec(r=8, alpha=16, dropout=0.0)
    )
    return SFTModule(config, optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))


def demo_data(data_dir: Path, model_dir: Path, **kwargs: Any) -> SFTDataModule:
    files = {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")}
    kwargs = {"batch_size": 32, "eval_batch_size": 100, **kwargs}
    return SFTDataModule(path="json", data_files=files, tokenizer=str(model_dir), max_length=32, **kwargs)


def validate(module: SFTModule, data: SFTDataModule, root: Path) -> dict[str, float]:
    return trainer(root).validate(module, datamodule=data, verbose=False)[0]


def mean_gold_score(model: torch.nn.Module, tok: Any, per_topic: int = 64, seed: int = 0) -> float:
    """Mean gold score of sampled completions, ``per_topic`` for each of the task's prompts."""
    torch.manual_seed(seed)
    model.eval()
    scores = []
    for topic in synthetic.TOPICS:
        prompt = synthetic.make_prompt(topic)
        input_ids = torch.tensor([encode(tok, prompt)] * per_topic)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                max_new_tokens=12,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
            )
        for response in tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True):
            scores.append(synthetic.gold_score(prompt, response))
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def trained_lora(tiny_model_dir: Path, demos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A LoRA SFT run of 80 steps, with what the tests compare it against."""
    root = tmp_path_factory.mktemp("sft_lora")
    torch.manual_seed(0)
    module = sft_module(tiny_model_dir)
    data = demo_data(demos_dir, tiny_model_dir)
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    before = validate(module, data, root)
    trainer(root, max_steps=80, limit_val_batches=0).fit(module, datamodule=data)
    after = validate(module, data, root)
    return {
        "module": module,
        "data": data,
        "frozen": frozen,
        "adapters": adapters,
        "before": before,
        "after": after,
        "root": root,
    }


def test_lora_sft_lowers_loss_and_touches_only_the_adapter(trained_lora: dict) -> None:
    module, before, after = trained_lora["module"], trained_lora["before"], trained_lora["after"]
    assert after["val/loss"] < before["val/loss"] - 0.1, (before, after)
    assert after["val/perplexity"] == pytest.approx(torch.tensor(after["val/loss"]).exp().item(), rel=1e-5)
    assert 0.0 < after["val/token_accuracy"] <= 1.0
    adapters, frozen = trained_lora["adapters"], trained_lora["frozen"]
    assert adapters and all("lora_" in n for n in adapters), "only LoRA tensors train"
    params = dict(module.named_parameters())
    assert all(not torch.equal(params[n], p) for n, p in adapters.items()), "every adapter tensor moves"
    for name, value in frozen.items():
        assert torch.equal(params[name], value), f"frozen backbone tensor {name} changed"


def test_sft_policy_scores_higher_than_the_base_model(trained_lora: dict, tiny_model_dir: Path) -> None:
    module = trained_lora["module"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_score = mean_gold_score(base, module.tokenizer)
    sft_score = mean_gold_score(module.model, module.tokenizer)
    assert sft_score > base_score + 0.3, (base_score, sft_score)


def test_val_loss_is_the_token_mean_over_the_epoch(trained_lora: dict) -> None:
    """A batch with one (improbable) trained token and a batch with many: the epoch loss weighs
    tokens, not batches."""
    module, data = trained_lora["module"], trained_lora["data"]
    collate = SFTCollator(PAD_ID)
    rows = [data.datasets["val"][i] for i in range(31)]
    one = collate(rows[:1])
    one["labels"].fill_(IGNORE)
    one["labels"][0, 3] = 5  # '<|end|>' in the middle of a prompt
    batches = [one, collate(rows[1:])]
    sums, counts = [], []
    module.eval()
    with torch.no_grad():
        for batch in batches:
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE
            logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums.append(-logp[mask].sum().item())
            counts.append(int(mask.sum()))
    token_mean = sum(sums) / sum(counts)
    batch_mean = sum(s / n for s, n in zip(sums, counts, strict=True)) / len(counts)
    assert counts[0] == 1 and batch_mean > token_mean + 1.0, (sums, counts)
    loader = DataLoader(batches, batch_size=None)
    metrics = trainer(trained_lora["root"]).validate(module, dataloaders=loader, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(token_mean, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_export_reloads_with_plain_transformers_and_peft(
    trained_lora: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    module, data = trained_lora["module"], trained_lora["data"]
    module.save_pretrained(tmp_path / "adapter")
    module.save_pretrained(tmp_path / "merged", merged=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    batch = next(iter(data.val_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.eval()
    with torch.no_grad():
        expected = module(**inputs)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        untouched = base(**inputs).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        for reloaded in (peft_model, merged):
            torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-5)
    assert (expected - untouched).abs().max() > 1e-2, "the export should differ from the base model"


def test_full_fine_tuning_lowers_loss_and_exports_a_plain_model(
    tiny_model_dir: Path, demos_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = sft_module(tiny_model_dir, finetune="full", lr=1e-3)
    data = demo_data(demos_dir, tiny_model_dir)
    module.configure_model()
    assert all(p.requires_grad for p in module.parameters())
    before = validate(module, data, tmp_path)
    trainer(tmp_path, max_steps=30, limit_val_batches=0).fit(module, datamodule=data)
    after = validate(module, data, tmp_path)
    assert after["val/loss"] < before["val/loss"] - 0.1, (before, after)

    module.save_pretrained(tmp_path / "full")
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
        torch.testing.assert_close(
            reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            module(batch["input_ids"], batch["attention_mask"]),
            rtol=0,
            atol=1e-5,
        )


def test_checkpoint_holds_only_the_adapter_and_resumes_exactly(
    tiny_model_dir: Path, demos_dir: Path, tmp_path: Path
) -> None:
    data_kwargs = {"max_train_samples": 128}  # 4 steps per epoch

    def run(
        root: Path, epochs: int, ckpt_path: str | None = None, **kwargs: Any
    ) -> tuple[SFTModule, L.Trainer]:
        torch.manual_seed(0)
        module = sft_module(tiny_model_dir)
        t = trainer(root, max_epochs=epochs, limit_val_batches=0, **kwargs)
        t.fit(module, datamodule=demo_data(demos_dir, tiny_model_dir, **data_kwargs), ckpt_path=ckpt_path)
        return module, t

    straight, _ = run(tmp_path / "straight", epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first, _ = run(tmp_path / "first", epochs=1, enable_checkpointing=True, callbacks=[ckpt])
    last = tmp_path / "ckpt" / "last.ckpt"
    keys = set(torch.load(last, weights_only=True)["state_dict"])
    assert keys == first.trainable_names() and all("lora_" in k for k in keys), sorted(keys)[:5]

    resumed, t = run(tmp_path / "resumed", epochs=2, ckpt_path=str(last))
    assert t.global_step == 8
    final = dict(resumed.named_parameters())
    for name, param in straight.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(final[name], param, rtol=0, atol=1e-6)
