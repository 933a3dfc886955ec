"""Policy evaluation: log-probs ignore padding, KL to oneself is zero, scores are reproducible."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from perlhf.data import synthetic
from perlhf.data.rollout_utils import left_pad, right_pad
from perlhf.evaluate import evaluate_policy, reward_scores, sequence_logprob


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    reward.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, policy, reward


def test_sequence_logprob_ignores_padding(models) -> None:
    tokenizer, policy, _ = models
    prompts = [tokenizer(p)["input_ids"] for p in ("Name some colours:", "Which tools do you know?")]
    responses = [tokenizer(" red blue")["input_ids"] + [0], tokenizer(" saw")["input_ids"]]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = sequence_logprob(policy, prompt_ids, prompt_mask, response_ids, response_mask, 0.7)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            logits = policy(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
            alone = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum()
            assert batched[i].item() == pytest.approx(alone.item(), abs=1e-4)


def test_reward_scores_match_unpadded_forward(models) -> None:
    tokenizer, _, reward = models
    texts = ["Name some colours: red blue green", "Name some tools: saw"]
    scores = reward_scores(reward, tokenizer, texts, batch_size=2)
    with torch.no_grad():
        for text, score in zip(texts, scores, strict=True):
            alone = reward(**tokenizer([text], return_tensors="pt")).logits[0, 0]
            assert score.item() == pytest.approx(alone.item(), abs=1e-5)


def test_evaluate_policy_scores_kl_and_reproducibility(models) -> None:
    tokenizer, policy, reward = models
    prompts = synthetic.prompt_pool("heldout")
    kwargs = dict(samples_per_prompt=8, max_new_tokens=10, batch_size=16, seed=3)
    args = (policy, tokenizer, prompts, synthetic.gold_score, reward, tokenizer)

    first = evaluate_policy(*args, reference=policy, **kwargs)
    again = evaluate_policy(*args, reference=policy, **kwargs)
    assert first.as_dict() == again.as_dict() and first.responses == again.responses
    assert first.samples == len(first.responses) == 32
    assert abs(first.kl_to_reference) < 1e-5  # a policy is its own reference
    rows = [p for p in prompts for _ in range(8)]
    gold = sum(synthetic.gold_score(p, r) for p, r in zip(rows, first.responses, strict=True)) / 32
    assert first.gold_score == pytest.approx(gold)
    rm = reward_scores(reward, tokenizer, [p + r for p, r in zip(rows, first.responses, strict=True)])
    assert first.reward_model_score == pytest.approx(rm.mean().item(), abs=1e-5)
    assert 1 <= first.response_length <= 10 and 0 <= first.eos_fraction <= 1

    # A different reference: KL(π‖π_ref) estimated on π's samples is positive.
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shifted = evaluate_policy(*args, reference=other, **kwargs)
    assert shifted.kl_to_reference > 0.1
    assert shifted.responses == first.responses  # the reference does not change the samples
