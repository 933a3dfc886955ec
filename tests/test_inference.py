"""Inference without a Trainer: reward scores independent of padding, exports that load and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perlhf import LoraSpec, ModelConfig, Policy, PPOModule, RewardModel, RewardModule

TEXTS = ["Which animals do you know? cat dog horse", "Name some colours: red", "Tools? saw"]


def randomised(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Give fresh LoRA B matrices and score heads non-zero values, so the adapter matters."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, std)
    return module


@pytest.fixture(scope="module")
def reward_module(tiny_model_dir: Path) -> RewardModule:
    torch.manual_seed(0)
    module = RewardModule(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0)))
    module.configure_model()
    return randomised(module).eval()


def padded(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append(row + [pad_id] * fill if side == "right" else [pad_id] * fill + row)
        mask.append([1] * len(row) + [0] * fill if side == "right" else [0] * fill + [1] * len(row))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad", ["pad", "eos", "zero", "word"])
def test_reward_scores_do_not_depend_on_padding(reward_module: RewardModule, side: str, pad: str) -> None:
    tok = reward_module.tokenizer
    rows = [tok(t)["input_ids"] for t in TEXTS]
    pad_id = {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "zero": 0, "word": rows[0][1]}[pad]
    with torch.no_grad():
        alone = torch.cat(
            [reward_module(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
        )
        scores = reward_module(*padded(rows, pad_id, side))
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)


def test_reward_model_export_scores_as_the_module_with_any_padding(
    reward_module: RewardModule, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    export = reward_module.save_pretrained(tmp_path / "adapter")
    prompts, responses = ["Which animals do you know?", "Name some colours:"], [" cat dog horse", " red"]
    tok = reward_module.tokenizer
    with torch.no_grad():
        expected = torch.cat(
            [
                reward_module(*padded([tok(p + r)["input_ids"]], tok.pad_token_id, "right"))
                for p, r in zip(prompts, responses, strict=True)
            ]
        )
    capfd.readouterr()
    rm = RewardModel.from_pretrained(export)
    assert "MISSING" not in capfd.readouterr().err  # the head comes from the adapter: nothing to report
    torch.testing.assert_close(rm.score(prompts, responses), expected, rtol=0, atol=1e-5)
    rm.tokenizer.padding_side = "left"
    rm.tokenizer.pad_token = rm.tokenizer.eos_token
    torch.testing.assert_close(rm.score(prompts, responses), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(prompts, responses[:1])


@pytest.mark.parametrize("merged", [False, True])
def test_policy_export_generates_as_the_module(tiny_model_dir: Path, tmp_path: Path, merged: bool) -> None:
    torch.manual_seed(0)
    module = PPOModule(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0)))
    module.configure_model()
    randomised(module)
    export = module.save_pretrained(tmp_path / "export", merged=merged)
    prompts = ["Which animals do you know?", "Name some colours:"]
    tok = module.tokenizer
    ids = [tok(p)["input_ids"] for p in prompts]
    prompt_ids, prompt_mask = padded(ids, tok.pad_token_id, "left")
    out = module.generate(
        prompt_ids,
        prompt_mask,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    expected = []
    for row in out.tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        expected.append(tok.decode(row, skip_special_tokens=True))
    policy = Policy.from_pretrained(export)
    assert policy.generate(prompts, max_new_tokens=6, do_sample=False) == expected
    assert any(expected)  # something was generated
