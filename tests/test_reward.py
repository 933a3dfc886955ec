"""RewardModule: it learns, LoRA leaves the backbone untouched, checkpoints resume exactly, and
exports reload with plain transformers + peft."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer as trainer
from helpers import save_tiny_vit
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from perlhf.data import PreferenceDataModule
from perlhf.models import LoraSpec, ModelConfig, build_reward_model
from perlhf.modules import RewardModule


def reward_module(model_dir: Path, finetune: str = "lora", lr: float = 3e-3) -> RewardModule:
    config = ModelConfig(
        name_or_path=str(model_dir), finetune=finetune, lora=LoraSpec(r=8, alpha=16, dropout=0.0)
    )
    return RewardModule(config, optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))


def preference_data(data_dir: Path, model_dir: Path, **kwargs) -> PreferenceDataModule:
    files = {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "val.jsonl")}
    kwargs = {"batch_size": 32, **kwargs}
    return PreferenceDataModule(
        path="json", data_files=files, tokenizer=str(model_dir), max_length=64, **kwargs
    )


def snapshot(module: torch.nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad == trainable}


def val_accuracy(module: RewardModule, data: PreferenceDataModule, root: Path) -> float:
    return trainer(root).validate(module, datamodule=data, verbose=False)[0]["val/accuracy"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reward_model_learns(
    finetune: str, tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)  # the outcome must not depend on which tests ran before
    module = reward_module(tiny_model_dir, finetune, lr=3e-3 if finetune == "lora" else 1e-3)
    data = preference_data(preference_dir, tiny_model_dir)
    module.configure_model()
    frozen, trained = snapshot(module, trainable=False), snapshot(module, trainable=True)
    before = val_accuracy(module, data, tmp_path)

    trainer(tmp_path, max_steps=300, limit_val_batches=0).fit(module, datamodule=data)
    after = val_accuracy(module, data, tmp_path)

    # Seeds 0-3 end at 0.795-0.855 (gold-labelled pairs, noisy training labels; chance 0.5).
    assert after >= 0.75, f"held-out pairwise accuracy {after:.3f} (was {before:.3f})"
    assert after > before + 0.15
    changed = [n for n, p in module.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    # The final LayerNorm bias shifts chosen and rejected scores by the same constant, which
    # cancels in r_c - r_r: its gradient is exactly zero under the pairwise loss.
    invariant = {"model.transformer.ln_f.bias"}
    assert set(changed) == set(trained) - invariant, "every trainable tensor should have moved"
    if finetune == "lora":
        assert any("lora_A" in n for n in trained) and any("score" in n for n in trained)
        assert all("lora_" in n or "score" in n for n in trained), "only adapters and head train"
        for name, param in module.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]), f"frozen backbone tensor {name} changed"
    else:
        assert not frozen, "full fine-tuning trains every weight"
        assert "model.transformer.h.0.attn.c_attn.weight" in changed


def test_checkpoint_holds_only_trained_tensors_and_resumes_exactly(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    data_kwargs = {"max_train_samples": 256, "batch_size": 32}  # 8 steps per epoch

    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[RewardModule, L.Trainer]:
        torch.manual_seed(0)
        module = reward_module(tiny_model_dir)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        t = trainer(root, max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt])
        t.fit(
            module,
            datamodule=preference_data(preference_dir, tiny_model_dir, **data_kwargs),
            ckpt_path=ckpt_path,
        )
        return module, t

    straight, _ = run(tmp_path / "straight", epochs=2)
    first, first_trainer = run(tmp_path / "first", epochs=1)
    last = tmp_path / "first" / "ckpt" / "last.ckpt"

    checkpoint = torch.load(last, weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k or "score" in k for k in keys), keys
    assert set(keys) == first.trainable_names()
    assert last.stat().st_size < 0.5 * sum(p.numel() * 4 for p in first.parameters())
    saved_state = first_trainer.optimizers[0].state_dict()

    seen: dict = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["step"] = trainer.global_step
            seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())

    torch.manual_seed(0)
    resumed = reward_module(tiny_model_dir)
    t = trainer(tmp_path / "resumed", max_epochs=2, limit_val_batches=0, callbacks=[Capture()])
    t.fit(
        resumed,
        datamodule=preference_data(preference_dir, tiny_model_dir, **data_kwargs),
        ckpt_path=str(last),
    )

    assert seen["step"] == 8
    for index, state in saved_state["state"].items():
        for key, value in state.items():
            assert torch.equal(seen["optimizer"]["state"][index][key], value), key
    final = dict(resumed.named_parameters())
    for name, param in straight.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(final[name], param, rtol=0, atol=1e-6)


def test_export_reloads_with_plain_transformers_and_peft(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    module = reward_module(tiny_model_dir)
    data = preference_data(preference_dir, tiny_model_dir)
    trainer(tmp_path, max_steps=20, limit_val_batches=0).fit(module, datamodule=data)
    module.save_pretrained(tmp_path / "adapter")
    module.save_pretrained(tmp_path / "merged", merged=True)

    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        for reloaded in (peft_model, merged):
            scores = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.testing.assert_close(scores.squeeze(-1), expected, rtol=0, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert expected.std() > 0


def test_not_a_sequence_classifier_is_rejected(tmp_path: Path) -> None:
    vit = save_tiny_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match="no sequence-classification variant"):
        build_reward_model(ModelConfig(name_or_path=vit), pad_token_id=0)


def test_lora_target_matching_nothing_is_rejected(tiny_model_dir: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no module.*c_attn"):
        build_reward_model(config, pad_token_id=1)


def test_default_lora_targets_are_attention_only(tiny_model_dir: Path) -> None:
    model = build_reward_model(ModelConfig(name_or_path=str(tiny_model_dir)), pad_token_id=1)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {
        f"base_model.model.transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")
    }


def test_objective_and_data_mismatch_is_explained(tiny_model_dir: Path) -> None:
    module = reward_module(tiny_model_dir)
    module.configure_model()
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3),
        "labels": torch.ones(2),
    }
    with pytest.raises(ValueError, match="objective: classifier"):
        module.training_step(batch, 0)


def test_classifier_objective_learns_good_bad_labels(tiny_model_dir: Path, tmp_path: Path) -> None:
    from perlhf.data import synthetic

    rows = []
    for i, row in enumerate(synthetic.preference_pairs(3000, seed=3, noisy=False)):
        response = row["chosen"] if i % 2 else row["rejected"]  # good/bad labels near balanced
        label = int(synthetic.gold_score(row["prompt"], response) >= 2)
        rows.append({"prompt": row["prompt"], "response": response, "label": label})
    for split, part in (("train", rows[:2800]), ("test", rows[2800:])):
        synthetic.write_jsonl(iter(part), tmp_path / f"{split}.jsonl")
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    module = RewardModule(config, objective="classifier", optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = PreferenceDataModule(
        path="json",
        data_files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
        tokenizer=str(tiny_model_dir),
        max_length=64,
        batch_size=32,
    )
    trainer(tmp_path, max_steps=120, limit_val_batches=0).fit(module, datamodule=data)
    metrics = trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/accuracy"] >= 0.65 and metrics["val/auroc"] >= 0.75, metrics  # chance: 0.5


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_model_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = ModelConfig(
            name_or_path=str(tiny_model_dir),
            lora=LoraSpec(r=4, alpha=8, dropout=0.0),
            gradient_checkpointing=checkpointing,
        )
        model = build_reward_model(config, pad_token_id=1).train()
        for module in model.modules():  # deterministic forward: no dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.1)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 1]])
        model(input_ids=ids, attention_mask=(ids != 1).long()).logits.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(n for n in grads[1] if "lora_A" in n)
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, f"no gradient reached {name} under checkpointing"
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
