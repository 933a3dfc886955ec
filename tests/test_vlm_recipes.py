"""The VQA recipe: its backbone's architecture gets LoRA on the language model only, and VQAv2
answers with their confidence become good/bad classifier rows."""

from __future__ import annotations

import re

import pytest
from transformers import (
    AutoModelForImageTextToText,
    Idefics3Config,
    LlamaConfig,
    LlavaOnevisionConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from perlhf.data.vqa import classifier_rows
from perlhf.models import check_targets, default_lora_targets
from perlhf.vlm import is_vision_language

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT |= {"num_key_value_heads": 2, "vocab_size": 128}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def tiny_idefics3():  # HuggingFaceTB/SmolVLM-256M-Instruct's architecture
    vision = {"model_type": "idefics3_vision", **VISION, "image_size": 32, "patch_size": 8}
    return Idefics3Config(text_config=LlamaConfig(**TEXT).to_dict(), vision_config=vision, image_token_id=1)


def tiny_llava_onevision():  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf's architecture
    vision = SiglipVisionConfig(**VISION, image_size=32, patch_size=8)
    return LlavaOnevisionConfig(text_config=Qwen2Config(**TEXT), vision_config=vision, image_token_id=1)


@pytest.mark.parametrize("make", [tiny_idefics3, tiny_llava_onevision], ids=["idefics3", "llava_onevision"])
@pytest.mark.parametrize("vision", [False, True])
def test_default_lora_targets_are_the_language_models_attention(make, vision: bool) -> None:
    model = AutoModelForImageTextToText.from_config(make())
    assert is_vision_language(model.config)
    targets = default_lora_targets(model, vision=vision)
    check_targets(model, targets)
    adapted = {n for n, _ in model.named_modules() if re.fullmatch(targets, n)}
    text = {n for n in adapted if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    lm_layers = {n for n in adapted if ".layers." in n and "vision" not in n}
    assert len(lm_layers) == 2 * 4 and text >= lm_layers, adapted  # 2 layers x q/k/v/o
    vision_adapted = adapted - lm_layers
    if vision:
        assert len(vision_adapted) == 2 * 4 and all("self_attn" in n for n in vision_adapted), vision_adapted
    else:
        assert not vision_adapted, f"the vision tower must stay unadapted: {sorted(vision_adapted)}"


def vqa_row(consensus: str, answers: list[tuple[str, str]]) -> dict:
    return {
        "question": "Is the cat asleep?",
        "multiple_choice_answer": consensus,
        "answers": [
            {"answer": a, "answer_confidence": c, "answer_id": i} for i, (a, c) in enumerate(answers)
        ],
    }


def test_vqa_answers_become_good_and_bad_rows() -> None:
    answers = [("yes", "yes")] * 7 + [("no", "maybe"), ("No", "no"), ("maybe", "maybe")]
    answers[8] = ("no", "no")
    rows = classifier_rows(vqa_row("yes", answers), other="2")
    labels = {r["response"]: r["label"] for r in rows}
    # consensus with a confident annotator: good; "maybe" said once: bad (minority);
    # "no" said twice, once hesitantly: ambiguous, left out; another question's answer: bad.
    assert labels == {" yes": 1, " maybe": 0, " 2": 0}
    assert all(r["prompt"] == "Is the cat asleep?" for r in rows)


def test_vqa_unconfident_consensus_is_not_a_good_answer() -> None:
    rows = classifier_rows(vqa_row("red", [("red", "maybe")] * 10), other="red", prefix="")
    assert rows == []  # no confident consensus, and the other answer is this one
