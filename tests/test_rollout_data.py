"""RolloutDataModule: rollout batches have the promised layout, scores are the reward model's on
re-tokenised text (any tokenizer, adapter or merged model), reward shaping and the prompt stream
survive a checkpoint, and bad prompts fail naming their row."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
)

from perlhf.data import synthetic
from perlhf.data.rollout import RolloutDataModule
from perlhf.models import LoraSpec, ModelConfig, load_tokenizer
from perlhf.modules import RewardModule
from perlhf.tiny import build_tiny_tokenizer, save_tiny, tiny_config

FILLER, JUNK = 40, 41  # ordinary token ids of the tiny tokenizer (0: eos, 1: pad, 2-5: chat tokens)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny policy; reward models: plain classifier, LoRA adapter (+ its in-memory merge), one with
    a different tokenizer, and two non-classifiers."""
    root = tmp_path_factory.mktemp("rollout")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = save_tiny(root / "policy", pretrain_steps=50)
    tok = load_tokenizer(str(policy))
    torch.manual_seed(0)

    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).eval()
    reward.config.pad_token_id = tok.pad_token_id
    reward.save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")

    base = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    adapter = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"]))
    with torch.no_grad():  # LoRA starts as a no-op; make the adapter and its score head matter
        for name, param in adapter.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.2)
    adapter.save_pretrained(root / "adapter")  # no tokenizer: loading falls back to the base's
    merged = copy.deepcopy(adapter).merge_and_unload().eval()

    other_tok = build_tiny_tokenizer(vocab_size=300)
    other_tok.chat_template = None
    config = tiny_config(other_tok)
    config.num_labels = 1
    other = GPT2ForSequenceClassification(config).eval()
    other.save_pretrained(root / "other_reward")
    other_tok.save_pretrained(root / "other_reward")

    causal_adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(policy),
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]),
    )
    causal_adapter.save_pretrained(root / "causal_adapter")
    torch.set_num_threads(threads)
    return SimpleNamespace(
        root=root, policy=policy, tok=tok, reward=reward, merged=merged, other=other, other_tok=other_tok
    )


@pytest.fixture(scope="module")
def prompt_files(models: SimpleNamespace) -> dict[str, str]:
    """Eight distinct training prompts of different lengths, three held-out ones."""
    topics = list(synthetic.TOPICS)
    rows = [{"prompt": f"({i}) {synthetic.make_prompt(topics[i % 4])}" + " Go!" * (i % 3)} for i in range(11)]
    train = synthetic.write_jsonl(iter(rows[:8]), models.root / "prompts" / "train.jsonl")
    test = synthetic.write_jsonl(iter(rows[8:]), models.root / "prompts" / "test.jsonl")
    return {"train": str(train), "test": str(test)}


class FakePolicy(nn.Module):
    """What RolloutDataModule uses of the LightningModule: tokenizer_name_or_path, device, generate.

    Endings are forced so they are deterministic: rows in ``eos_rows`` emit EOS at ``eos_at``
    followed by junk (not pad: whatever follows EOS must be masked), other rows never emit EOS.
    """

    def __init__(self, policy_dir: Path, eos_rows: tuple[int, ...] = (), eos_at: int = 2) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
        self.tokenizer_name_or_path = str(policy_dir)
        self.eos_rows, self.eos_at = eos_rows, eos_at
        self.calls: list[dict] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, **kwargs})
        with torch.no_grad():
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        responses = out[:, prompt_ids.shape[1] :]
        responses = F.pad(responses, (0, kwargs["max_new_tokens"] - responses.shape[1]), value=1)
        responses[responses <= 1] = FILLER
        for row in self.eos_rows:
            if row < len(responses):
                responses[row, self.eos_at] = 0
                responses[row, self.eos_at + 1 :] = JUNK
        return responses


def rollout_data(
    files: dict[str, str] | str, reward: Path | str, policy: nn.Module, **kwargs
) -> RolloutDataModule:
    defaults = {"prompts_per_rollout": 4, "max_new_tokens": 6, "reward_batch_size": 3}
    if isinstance(files, dict):
        dm = RolloutDataModule("json", str(reward), data_files=files, **{**defaults, **kwargs})
    else:
        dm = RolloutDataModule(files, str(reward), **{**defaults, **kwargs})
    dm.trainer = SimpleNamespace(lightning_module=policy)  # how Lightning attaches a DataModule
    dm.setup("fit")
    return dm


def by_hand(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Reward of each text in its own unpadded forward pass."""
    with torch.no_grad():
        return torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts])


def first_rollout(dm: RolloutDataModule) -> dict:
    return next(iter(dm.train_dataloader()))


def test_batch_layout_masks_and_scores(models: SimpleNamespace, prompt_files: dict[str, str]) -> None:
    policy = FakePolicy(models.policy, eos_rows=(0, 5))
    dm = rollout_data(prompt_files, models.root / "reward", policy, samples_per_prompt=3)
    batch = first_rollout(dm)
    n, tok = 12, models.tok
    assert batch["prompt_ids"].shape[0] == n and batch["response_ids"].shape == (n, 6)
    for key in ("scores", "raw_scores", "ended_with_eos"):
        assert batch[key].shape == (n,)
    assert batch["scores"].dtype == batch["raw_scores"].dtype == torch.float32
    assert batch["ended_with_eos"].dtype == torch.bool and batch["prompt_ids"].dtype == torch.long

    # Prompts: left-padded, mask marks the tokens, the k samples of a prompt share its rows.
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    assert (mask[:, -1] == 1).all() and (mask.diff(dim=1) >= 0).all()
    assert (ids[mask == 0] == tok.pad_token_id).all() and (mask == 0).any()
    for row in range(n):
        assert tok.decode(ids[row][mask[row].bool()]) == batch["prompts"][row]
        group = row // 3 * 3
        assert torch.equal(ids[row], ids[group]) and batch["prompts"][row] == batch["prompts"][group]
    assert len(set(batch["prompts"])) == 4
    call = policy.calls[0]
    assert torch.equal(call["prompt_ids"], ids) and torch.equal(call["prompt_mask"], mask)
    assert {k: call[k] for k in ("max_new_tokens", "do_sample", "eos_token_id", "pad_token_id", "top_k")} == {
        "max_new_tokens": 6,
        "do_sample": True,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "top_k": 0,
    }

    # Responses: cut after the first EOS (kept in the mask), junk after it becomes pad.
    ended = torch.tensor([row in (0, 5) for row in range(n)])
    assert torch.equal(batch["ended_with_eos"], ended)
    expected_mask = torch.ones(n, 6, dtype=torch.long)
    expected_mask[ended, 3:] = 0
    assert torch.equal(batch["response_mask"], expected_mask)
    assert (batch["response_ids"][ended, 2] == 0).all() and (batch["response_ids"][ended, 3:] == 1).all()
    assert not (batch["response_ids"] == JUNK).any()
    assert batch["responses"] == tok.batch_decode(batch["response_ids"], skip_special_tokens=True)

    # Scores: the reward model on re-tokenised prompt + response text, no shaping by default.
    texts = [p + r for p, r in zip(batch["prompts"], batch["responses"], strict=True)]
    assert torch.allclose(batch["raw_scores"], by_hand(models.reward, tok, texts), atol=1e-5)
    assert torch.equal(batch["scores"], batch["raw_scores"])
    stats = batch["stats"]
    assert batch["ended_with_eos"].float().mean().item() == pytest.approx(2 / 12)
    assert stats["reward/shaped_mean"] == pytest.approx(batch["raw_scores"].mean().item(), abs=1e-6)
    assert stats["rollout/generated_tokens"] == expected_mask.sum().item()
    assert stats["rollout/generate_s"] > 0 and stats["rollout/score_s"] > 0
    assert dm.rollouts_drawn == 1
    assert dm.reward_model.config.pad_token_id == tok.pad_token_id
    assert not any(p.requires_grad for p in dm.reward_model.parameters()) and not dm.reward_model.training


def test_reward_model_with_another_tokenizer(models: SimpleNamespace, prompt_files: dict[str, str]) -> None:
    dm = rollout_data(prompt_files, models.root / "other_reward", FakePolicy(models.policy, eos_rows=(1,)))
    assert len(dm.reward_tokenizer) != len(dm.tokenizer)
    batch = first_rollout(dm)
    texts = [p + r for p, r in zip(batch["prompts"], batch["responses"], strict=True)]
    other = by_hand(models.other, models.other_tok, texts)
    assert torch.allclose(batch["raw_scores"], other, atol=1e-5)
    assert not torch.allclose(batch["raw_scores"], by_hand(models.reward, models.tok, texts), atol=1e-3)


def test_adapter_reward_model_matches_merged_model(
    models: SimpleNamespace, prompt_files: dict[str, str]
) -> None:
    prompts = ["Name some fruits:", "Name some tools:", "Name some colours:", "(7) Name some animals:"]
    responses = [" apple pear plum", " hammer", " red red cat dog blue", ""]
    expected = by_hand(models.merged, models.tok, [p + r for p, r in zip(prompts, responses, strict=True)])
    for base in (None, str(models.policy)):
        dm = rollout_data(prompt_files, models.root / "adapter", FakePolicy(models.policy), reward_base=base)
        assert type(dm.reward_model).__name__ == "GPT2ForSequenceClassification"  # merged, not a PeftModel
        assert torch.allclose(dm.score(prompts, responses), expected, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_reward_module_export_scores_as_the_module(
    merged: bool, models: SimpleNamespace, prompt_files: dict[str, str], tmp_path: Path
) -> None:
    module = RewardModule(ModelConfig(name_or_path=str(models.policy), lora=LoraSpec(r=4, dropout=0.0)))
    module.configure_model()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.2)
    export = module.save_pretrained(tmp_path / "export", merged=merged)
    dm = rollout_data(prompt_files, export, FakePolicy(models.policy))
    prompts, responses = ["Name some fruits:", "(3) Name some tools: Go!"], [" apple pear", " saw saw"]
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    expected = by_hand(module.model.eval(), models.tok, texts)
    assert torch.allclose(dm.score(prompts, responses), expected, atol=1e-5)


@pytest.mark.parametrize("folder", ["policy", "causal_adapter"])
def test_non_classifier_reward_model_is_refused(
    folder: str, models: SimpleNamespace, prompt_files: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="must be a sequence classifier") as err:
        rollout_data(prompt_files, models.root / folder, FakePolicy(models.policy))
    assert ("GPT2LMHeadModel" if folder == "policy" else "CAUSAL_LM") in str(err.value)


def test_missing_eos_penalty_then_clip(models: SimpleNamespace, prompt_files: dict[str, str]) -> None:
    dm = rollout_data(
        prompt_files,
        models.root / "reward",
        FakePolicy(models.policy, eos_rows=(1, 2)),
        missing_eos_penalty=-1.0,
        reward_clip=0.6,
    )
    batch = first_rollout(dm)
    raw, ended = batch["raw_scores"], batch["ended_with_eos"]
    penalised = raw - 1.0 * (~ended)
    assert torch.allclose(batch["scores"], penalised.clamp(-0.6, 0.6), atol=1e-6)
    assert (penalised.abs() > 0.6).any()
    stats = batch["stats"]
    assert stats["reward/penalised_fraction"] == 0.5
    assert stats["reward/clipped_fraction"] == (penalised.abs() > 0.6).float().mean().item()


def test_running_normalisation_and_prompt_stream_resume(
    models: SimpleNamespace, prompt_files: dict[str, str]
) -> None:
    policy = FakePolicy(models.policy)
    dm = rollout_data(
        prompt_files, models.root / "reward", policy, normalize_rewards=True, rollouts_per_epoch=2
    )
    first, second = list(dm.train_dataloader())
    seen = torch.cat([first["raw_scores"], second["raw_scores"]]).double()
    assert dm.moments.count == 8
    assert dm.moments.mean == pytest.approx(seen.mean().item(), abs=1e-9)
    assert dm.moments.std == pytest.approx(seen.std(correction=0).item(), abs=1e-9)
    expected = (second["raw_scores"].double() - seen.mean()) / seen.std(correction=0)
    assert torch.allclose(second["scores"], expected.float(), atol=1e-5)
    assert second["stats"]["reward/running_mean"] == pytest.approx(seen.mean().item())
    # One pass over the 8 training prompts, then a new order.
    assert sorted(first["prompts"] + second["prompts"]) == sorted(p.text for p in dm.prompts["train"])
    assert dm.train_indices(2) + dm.train_indices(3) != dm.train_indices(0) + dm.train_indices(1)

    # Validation normalises with the running statistics but leaves them alone.
    before = copy.deepcopy(dm.moments)
    val = next(iter(dm.val_dataloader()))
    assert dm.moments == before
    expected = (val["raw_scores"].double() - seen.mean()) / seen.std(correction=0)
    assert torch.allclose(val["scores"], expected.float(), atol=1e-5)

    state = dm.state_dict()
    assert state["rollouts_drawn"] == 2
    resumed = rollout_data(prompt_files, models.root / "reward", policy, normalize_rewards=True)
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.moments == dm.moments
    third = first_rollout(dm)
    assert first_rollout(resumed)["prompts"] == third["prompts"]


def test_ranks_split_the_prompt_stream(models: SimpleNamespace, prompt_files: dict[str, str]) -> None:
    dm = rollout_data(prompt_files, models.root / "reward", FakePolicy(models.policy))
    single = [dm.train_indices(c) for c in range(4)]
    streams = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(
            lightning_module=dm.trainer.lightning_module, global_rank=rank, world_size=2
        )
        streams.append([dm.train_indices(c) for c in range(2)])
        assert len(dm._val_shard()) == 2  # 3 held-out prompts, padded to 2 per rank
    assert [streams[r][c] for c in range(2) for r in (0, 1)] == single  # rank r takes every other slice


def test_validation_covers_held_out_prompts_without_updating_stats(
    models: SimpleNamespace, prompt_files: dict[str, str]
) -> None:
    dm = rollout_data(
        prompt_files,
        models.root / "reward",
        FakePolicy(models.policy),
        prompts_per_rollout=2,
        normalize_rewards=True,
        samples_per_prompt=4,
    )
    batches = list(dm.val_dataloader())
    assert [len(b["prompts"]) for b in batches] == [2, 1]  # one sample per prompt
    assert [p for b in batches for p in b["prompts"]] == [p.text for p in dm.prompts["val"]]
    assert dm.moments.count == 0 and dm.rollouts_drawn == 0
    assert torch.equal(batches[0]["scores"], batches[0]["raw_scores"])  # nothing to normalise with yet
    again = list(dm.test_dataloader())
    assert [b["responses"] for b in again] == [b["responses"] for b in batches]  # seeded sampling


def test_val_fraction_held_out_of_a_single_file(
    models: SimpleNamespace, prompt_files: dict[str, str]
) -> None:
    dm = rollout_data(
        prompt_files["train"], models.root / "reward", FakePolicy(models.policy), val_fraction=0.25
    )
    train, val = {p.text for p in dm.prompts["train"]}, {p.text for p in dm.prompts["val"]}
    assert len(val) == 2 and len(train) == 6 and not train & val


def write_prompts(path: Path, prompts: list) -> str:
    return str(synthetic.write_jsonl(iter({"prompt": p} for p in prompts), path))


def test_empty_prompt_names_its_row(models: SimpleNamespace, tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.jsonl", ["Name some fruits:", "Name some tools:", "  ", "x"])
    with pytest.raises(ValueError, match=r"row 2, column 'prompt': the prompt is empty"):
        rollout_data({"train": path, "test": path}, models.root / "reward", FakePolicy(models.policy))


def test_overlong_prompts_error_or_keep_their_end(models: SimpleNamespace, tmp_path: Path) -> None:
    long = "Name some fruits: apple pear plum mango lemon grape peach melon, and now name some tools:"
    path = write_prompts(tmp_path / "p.jsonl", ["Name some tools:", long, "Name some colours:", long])
    files = {"train": path, "test": path}
    with pytest.raises(
        ValueError, match=r"p.jsonl\[train\] row 1, .* longer than max_prompt_length=8"
    ) as err:
        rollout_data(
            files,
            models.root / "reward",
            FakePolicy(models.policy),
            max_prompt_length=8,
            overlong_prompt="error",
        )
    assert "overlong_prompt='truncate'" in str(err.value)

    dm = rollout_data(files, models.root / "reward", FakePolicy(models.policy), max_prompt_length=8)
    full = models.tok(long)["input_ids"]
    assert len(full) > 8 and dm.num_truncated == {"train": 2, "val": 2}
    prompt = dm.prompts["train"][1]
    assert prompt.ids == full[-8:] and prompt.truncated and prompt.text == models.tok.decode(full[-8:])
    assert long.endswith(prompt.text) and "tools:" in prompt.text
    assert dm.prompts["train"][0].ids == models.tok("Name some tools:")["input_ids"]
    batch = first_rollout(dm)
    assert batch["prompt_ids"].shape[1] <= 8


@pytest.mark.parametrize("reward", ["reward", "other_reward"])
def test_chat_prompts_use_the_policy_template(reward: str, models: SimpleNamespace, tmp_path: Path) -> None:
    chats = [[{"role": "user", "content": synthetic.make_prompt(t)}] for t in synthetic.TOPICS]
    chats[1] = [{"role": "system", "content": "Be brief."}, *chats[1]]
    path = write_prompts(tmp_path / "chat.jsonl", chats)
    dm = rollout_data({"train": path, "test": path}, models.root / reward, FakePolicy(models.policy))
    tok = models.tok
    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    assert [p.text for p in dm.prompts["train"]] == rendered
    assert rendered[1].startswith("<|system|>\nBe brief.<|end|>\n") and rendered[1].endswith(
        "<|assistant|>\n"
    )
    batch = first_rollout(dm)
    by_text = dict(zip(rendered, chats, strict=True))
    if reward == "reward":  # the reward tokenizer has a chat template: it renders the conversation
        texts = [
            tok.apply_chat_template([*by_text[p], {"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(batch["prompts"], batch["responses"], strict=True)
        ]
        assert texts[0].endswith(batch["responses"][0] + "<|end|>\n")
        expected = by_hand(models.reward, tok, texts)
    else:  # no template: rendered prompt + response text
        texts = [p + r for p, r in zip(batch["prompts"], batch["responses"], strict=True)]
        expected = by_hand(models.other, models.other_tok, texts)
    assert torch.allclose(batch["raw_scores"], expected, atol=1e-5)


class TinyRL(L.LightningModule):
    """Records the order of generation and training steps; trains nothing."""

    def __init__(self, policy_dir: Path) -> None:
        super().__init__()
        self.policy = FakePolicy(policy_dir, eos_rows=(0,))
        self.tokenizer_name_or_path = str(policy_dir)
        self.automatic_optimization = False
        self.events: list[str] = []
        self.trained_prompts: list[list[str]] = []

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        self.events.append("generate")
        return self.policy.generate(prompt_ids, prompt_mask, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.events.append("train")
        self.trained_prompts.append(batch["prompts"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.events.append("val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_samples_on_policy_and_checkpoints_the_stream(
    models: SimpleNamespace, prompt_files: dict[str, str], tmp_path: Path
) -> None:
    def fit(max_epochs: int, ckpt_path: Path | None = None) -> tuple[TinyRL, RolloutDataModule, L.Trainer]:
        module = TinyRL(models.policy)
        dm = RolloutDataModule(
            "json",
            str(models.root / "reward"),
            data_files=prompt_files,
            prompts_per_rollout=2,
            rollouts_per_epoch=3,
            max_new_tokens=4,
            normalize_rewards=True,
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module, dm, trainer

    module, dm, trainer = fit(1)
    # No prefetching: each rollout is generated right before the step that trains on it.
    assert module.events == ["generate", "train"] * 3 + ["generate", "val"] * 2
    trainer.save_checkpoint(tmp_path / "rl.ckpt")
    checkpoint = torch.load(tmp_path / "rl.ckpt", weights_only=False)
    assert checkpoint["RolloutDataModule"]["rollouts_drawn"] == 3
    assert checkpoint["RolloutDataModule"]["reward_moments"] == dm.moments.state_dict()
    assert all(key.startswith("policy.") for key in checkpoint["state_dict"])  # no reward model inside

    resumed, resumed_dm, _ = fit(2, ckpt_path=tmp_path / "rl.ckpt")
    expected = [[dm.prompts["train"][i].text for i in dm.train_indices(c)] for c in range(3, 6)]
    assert resumed.trained_prompts == expected
    assert resumed_dm.rollouts_drawn == 6 and resumed_dm.moments.count == 12
