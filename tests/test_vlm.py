"""Vision-language models: image preference data batches align with the text, a LoRA reward model
on a VLM learns the shapes task with its backbone untouched and reloads with plain transformers +
peft, RL on image prompts raises reward, and bad images are reported with their row."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from perlhf.data import PreferenceDataModule, RolloutDataModule, shapes
from perlhf.data.images import image_inputs, load_image
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule, RewardModule
from perlhf.modules.rl_config import KLSpec, PPOSpec
from perlhf.tiny_vlm import save_tiny_vlm

KINDS = ("colour",)  # what the seconds-pretrained tiny backbone sees reliably (see shapes.corpus)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava", pretrain_steps=300)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    shapes.write_parquet(shapes.preference_pairs(2000, seed=1, kinds=KINDS), root / "pairs" / "train.parquet")
    shapes.write_parquet(shapes.preference_pairs(200, seed=2, kinds=KINDS), root / "pairs" / "test.parquet")
    shapes.write_parquet(shapes.prompts(400, seed=3, kinds=KINDS), root / "prompts.parquet")
    return root


def pair_data(shapes_dir: Path, vlm_dir: Path, **kwargs) -> PreferenceDataModule:
    files = {split: str(shapes_dir / "pairs" / f"{split}.parquet") for split in ("train", "test")}
    return PreferenceDataModule(
        path="parquet",
        data_files=files,
        tokenizer=str(vlm_dir),
        max_length=64,
        **{"batch_size": 32, **kwargs},
    )


def lora(r: int = 8) -> LoraSpec:
    return LoraSpec(r=r, alpha=2 * r, dropout=0.0)


@pytest.fixture(scope="module")
def vlm_reward(vlm_dir: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A LoRA reward model on the tiny VLM, trained on the shapes pairs; snapshots before training."""
    torch.manual_seed(0)
    module = RewardModule(
        ModelConfig(name_or_path=str(vlm_dir), lora=lora()), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    data = pair_data(shapes_dir, vlm_dir)
    root = tmp_path_factory.mktemp("vlm-rm")
    quiet_trainer(root, max_steps=150, limit_val_batches=0).fit(module, datamodule=data)
    accuracy = quiet_trainer(root).validate(module, datamodule=data, verbose=False)[0]["val/accuracy"]
    export = module.save_pretrained(root / "adapter")
    return {
        "module": module,
        "data": data,
        "frozen": frozen,
        "trained": trained,
        "accuracy": accuracy,
        "export": export,
    }


def test_image_pairs_batch_with_image_tokens_and_pixels_aligned(vlm_dir: Path, shapes_dir: Path) -> None:
    data = pair_data(shapes_dir, vlm_dir, batch_size=4)
    data.setup("fit")
    processor = data.processor
    batch = next(iter(data.val_dataloader()))
    config = AutoModelForImageTextToText.from_pretrained(vlm_dir).config
    per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2  # CLS dropped

    ids, pixels = batch["input_ids"], batch["vision"]["pixel_values"]
    assert ids.shape[0] == 8 and pixels.shape == (8, 3, shapes.CANVAS, shapes.CANVAS)
    assert ((ids == processor.image_token_id).sum(-1) == per_image).all()
    # Rows [:4] are chosen, [4:] rejected: same prompt and image, different answer.
    assert torch.equal(pixels[:4], pixels[4:])
    rows = data.datasets["val"]
    for i in range(4):
        expected = image_inputs(processor, rows[i]["images"])["pixel_values"][0]
        assert torch.equal(pixels[i], expected), f"pixel row {i} is not example {i}'s image"
        n = int(batch["attention_mask"][i].sum())
        answer = processor.tokenizer.decode(ids[i, :n]).rsplit("\n", 1)[-1]
        assert answer == shapes.gold_answer(
            shapes.QUESTIONS["colour"], load_image(rows[i]["images"][0], "row")
        )
    assert not torch.equal(pixels[0], pixels[1])


def test_image_files_and_pil_images_encode_like_image_bytes(vlm_dir: Path, tmp_path: Path) -> None:
    rows = list(shapes.classifier_rows(6, seed=4, kinds=KINDS))
    for i, row in enumerate(rows):
        row["images"][0].save(tmp_path / f"{i}.png")
    with (tmp_path / "train.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "images": [str(tmp_path / f"{i}.png")]}) + "\n")
    shapes.write_parquet(iter(rows), tmp_path / "train.parquet")
    batches = []
    for path in (tmp_path / "train.jsonl", tmp_path / "train.parquet"):
        data = PreferenceDataModule(path=str(path), tokenizer=str(vlm_dir), val_fraction=0.5, batch_size=3)
        data.setup("fit")
        batches.append(next(iter(data.val_dataloader())))
    assert batches[0]["labels"].shape == (3,) and batches[0]["vision"]["pixel_values"].shape[0] == 3
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batches[0][key], batches[1][key])
    assert torch.equal(batches[0]["vision"]["pixel_values"], batches[1]["vision"]["pixel_values"])


def test_missing_or_unreadable_images_name_row_column_and_path(vlm_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    good = tmp_path / "good.png"
    shapes.draw("red", "circle", __import__("random").Random(0)).save(good)
    cases = {
        "missing.png": r"row 1, column 'images': image file '.*missing\.png' not found",
        "broken.png": r"row 1, column 'images': image file '.*broken\.png' cannot be read as an image",
    }
    for name, message in cases.items():
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as f:
            for image in (good, tmp_path / name):
                f.write(
                    json.dumps(
                        {
                            "images": [str(image)],
                            "prompt": "What colour is the shape?",
                            "chosen": "red",
                            "rejected": "blue",
                        }
                    )
                    + "\n"
                )
        data = PreferenceDataModule(path=str(path), tokenizer=str(vlm_dir), val_split="train")
        with pytest.raises(ValueError, match=message):
            data.setup("validate")


def test_vlm_reward_model_learns_with_the_backbone_untouched(vlm_reward: dict) -> None:
    module = vlm_reward["module"]
    assert vlm_reward["accuracy"] >= 0.8, f"held-out pairwise accuracy {vlm_reward['accuracy']:.3f}"
    trained = vlm_reward["trained"]
    for name, param in module.named_parameters():
        if name in vlm_reward["frozen"]:
            assert torch.equal(param, vlm_reward["frozen"][name]), f"frozen backbone tensor {name} changed"
    changed = {n for n, p in module.named_parameters() if n in trained and not torch.equal(p, trained[n])}
    assert "model.score.weight" in changed and any("lora_A" in n for n in changed)
    # LoRA sits on the language model's attention only; the vision tower is frozen and unadapted.
    adapted = {n for n in trained if "lora_" in n}
    assert adapted and all(".language_model." in n and "self_attn" in n for n in adapted)
    assert not any("vision_tower" in n for n in trained)


def test_vlm_reward_export_reloads_with_plain_transformers_and_peft(vlm_reward: dict, vlm_dir: Path) -> None:
    module, export = vlm_reward["module"], vlm_reward["export"]
    batch = next(iter(vlm_reward["data"].val_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"], **batch["vision"])
        base = AutoModelForImageTextToText.from_pretrained(vlm_dir)
        model = PeftModel.from_pretrained(base, export).eval()
        hidden = (
            model.get_base_model()
            .model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["vision"])
            .last_hidden_state
        )
        last = batch["attention_mask"].sum(-1) - 1  # right padding
        scores = (
            hidden[torch.arange(len(last)), last] @ load_file(export / "reward_head.safetensors")["weight"].T
        )
    torch.testing.assert_close(scores.squeeze(-1), expected, rtol=0, atol=1e-5)
    assert expected.std() > 0
    assert AutoProcessor.from_pretrained(export).image_processor is not None


def test_vlm_rl_raises_reward(vlm_dir: Path, vlm_reward: dict, shapes_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PPOModule(
        ModelConfig(name_or_path=str(vlm_dir), lora=lora()),
        algorithm="reinforce",
        ppo=PPOSpec(epochs=1, minibatch_size=32, vf_coef=0.5),
        kl=KLSpec(coef=0.05),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}

    class CheckImages(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            assert batch["prompt_vision"][0]["pixel_values"].shape == (1, 3, shapes.CANVAS, shapes.CANVAS)

    data = RolloutDataModule(
        path=str(shapes_dir / "prompts.parquet"),
        reward_model=str(vlm_reward["export"]),
        val_fraction=0.2,  # 80 held-out image prompts, sampled with a fixed seed
        max_val_prompts=64,
        prompts_per_rollout=32,
        samples_per_prompt=2,
        rollouts_per_epoch=16,
        max_new_tokens=3,
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[CheckImages()])

    def held_out_reward() -> float:
        return trainer.validate(module, datamodule=data, verbose=False)[0]["val/reward"]

    # Training batches differ a lot in mean reward (different images and questions); compare the
    # frozen reward model's mean score on the same held-out prompts before and after instead.
    before = held_out_reward()
    trainer.fit(module, datamodule=data)
    after = held_out_reward()
    assert after > before + 0.5, f"held-out mean reward {before:.2f} -> {after:.2f}"
    for name, param in module.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"backbone tensor {name} changed"


@pytest.mark.parametrize(
    "escape", ["../outside.png", "{abs}", "~/outside.png"], ids=["dotdot", "absolute", "tilde"]
)
def test_image_paths_stay_under_image_root(escape: str, vlm_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    shapes.draw("red", "circle", __import__("random").Random(0)).save(outside)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shapes.draw("blue", "square", __import__("random").Random(1)).save(data_dir / "inside.png")
    path = data_dir / "pairs.jsonl"
    rows = [("inside.png"), escape.format(abs=outside)]
    path.write_text(
        "".join(
            json.dumps({"images": [image], "prompt": "Colour?", "chosen": "red", "rejected": "blue"}) + "\n"
            for image in rows
        )
    )
    data = PreferenceDataModule(path=str(path), tokenizer=str(vlm_dir), val_split="train")
    # "~" is not expanded: it names a folder "~" under the root, which does not exist.
    refused = (
        "image file '~/outside.png' not found"
        if escape.startswith("~")
        else "image path .* is outside image_root"
    )
    with pytest.raises(ValueError, match=rf"row 1, column 'images': {refused}"):
        data.setup("validate")
    if escape != "~/outside.png":  # with the user's consent, a path outside the root is read
        trusted = PreferenceDataModule(
            path=str(path), tokenizer=str(vlm_dir), val_split="train", allow_images_outside_root=True
        )
        trusted.setup("validate")
        assert len(trusted.datasets["val"]) == 2


def test_rollout_image_paths_stay_under_image_root(vlm_dir: Path, tmp_path: Path) -> None:
    """RL prompts read image paths like preference data: under ``image_root`` (by default the
    data file's folder), and a path that leaves it is refused unless the user allows it."""
    outside = tmp_path / "outside.png"
    shapes.draw("red", "circle", __import__("random").Random(0)).save(outside)
    images = tmp_path / "images"
    images.mkdir()
    shapes.draw("blue", "square", __import__("random").Random(1)).save(images / "inside.png")
    (tmp_path / "data").mkdir()
    gold = [{"function": "perlhf.data.synthetic.gold_reward", "name": "gold"}]

    def prompts(image: str, **kwargs) -> RolloutDataModule:
        path = tmp_path / "data" / "prompts.jsonl"
        path.write_text("".join(json.dumps({"images": [image], "prompt": q}) + "\n" for q in "ABCD"))
        data = RolloutDataModule(path=str(path), reward_functions=gold, tokenizer=str(vlm_dir), **kwargs)
        data.setup("fit")
        return data

    # The default root is the data file's folder, where inside.png is not.
    with pytest.raises(ValueError, match=r"column 'images': image file 'inside.png' not found .*data\)"):
        prompts("inside.png")
    assert len(prompts("inside.png", image_root=str(images)).prompts["train"][0].images) == 1
    for escape in ("../outside.png", str(outside)):
        with pytest.raises(ValueError, match=r"column 'images': image path .* is outside image_root"):
            prompts(escape, image_root=str(images))
        trusted = prompts(escape, image_root=str(images), allow_images_outside_root=True)
        assert len(trusted.prompts["train"][0].images) == 1
