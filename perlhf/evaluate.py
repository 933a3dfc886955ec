"""Evaluate policies the way RLHF papers do: sample, then score with the reward model and a gold scorer.

``evaluate_policy`` samples responses to held-out prompts from a policy (any ``transformers``
causal LM, e.g. a merged perlhf export) and reports the mean gold score, the frozen reward
model's score, the KL divergence to a reference policy (the SFT model RL started from), the
response length and how often the response ended with EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.data.rollout_utils import cut_at_eos, encode, left_pad, reward_scores
from perlhf.modules.policy import response_hidden, token_logprobs

__all__ = [
    "PolicyEval",
    "SampledBatch",
    "distinct_n",
    "evaluate_policy",
    "repeated_sentence_share",
    "reward_scores",
    "sample_batches",
    "sequence_kl",
    "sequence_logprob",
]


@dataclass
class PolicyEval:
    """Means over every sampled response."""

    gold_score: float
    reward_model_score: float
    kl_to_reference: float
    """``E_y~π[log π(y|x) − log π_ref(y|x)]`` in nats per response (at the sampling temperature)."""
    response_length: float
    """Tokens, EOS included."""
    eos_fraction: float
    samples: int
    responses: list[str] = field(default_factory=list, repr=False)
    """Every sampled response, in prompt-major order (``samples_per_prompt`` per prompt)."""

    def as_dict(self) -> dict[str, float]:
        """The means (``responses`` left out)."""
        return {k: v for k, v in asdict(self).items() if k != "responses"}


@dataclass
class SampledBatch:
    """One batch of sampled responses: left-padded prompts ``(N, P)``, right-padded responses
    ``(N, R)`` cut after the first EOS, and their decoded text."""

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    """``(N,)`` bool: the response ended with EOS within ``max_new_tokens``."""
    responses: list[str]


@torch.no_grad()
def sample_batches(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
    seed: int = 0,
) -> Iterator[SampledBatch]:
    """Sample one response per prompt text, ``batch_size`` at a time, with plain ancestral
    sampling at ``temperature`` (no top-k/top-p). Seeded per batch from ``seed``, so every policy
    sampled with the same seed gets the same noise."""
    device = next(policy.parameters()).device
    policy.eval()
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        prompt_ids, prompt_mask = left_pad([encode(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            out = policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        response_ids, response_mask, ended = cut_at_eos(
            out[:, prompt_ids.shape[1] :].long().cpu(), tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        yield SampledBatch(chunk, prompt_ids, prompt_mask, response_ids, response_mask, ended, responses)


@torch.no_grad()
def evaluate_policy(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    gold: Callable[[str, str], float],
    reward_model: PreTrainedModel,
    reward_tokenizer: PreTrainedTokenizerBase,
    reference: PreTrainedModel | None = None,
    samples_per_prompt: int = 64,
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> PolicyEval:
    """Sample ``samples_per_prompt`` responses per prompt and score them.

    Sampling is seeded (the same noise for every policy evaluated with the same seed). Without a
    ``reference`` the KL is 0 (the policy is its own reference).
    """
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    totals = {"gold": 0.0, "kl": 0.0, "length": 0.0, "eos": 0.0}
    texts: list[str] = []
    all_responses: list[str] = []
    for b in sample_batches(policy, tokenizer, rows, max_new_tokens, temperature, batch_size, seed):
        totals["gold"] += sum(gold(p, r) for p, r in zip(b.prompts, b.responses, strict=True))
        totals["length"] += b.response_mask.sum().item()
        totals["eos"] += b.ended.sum().item()
        if reference is not None:
            totals["kl"] += sequence_kl(policy, reference, b, temperature).sum().item()
        texts.extend(p + r for p, r in zip(b.prompts, b.responses, strict=True))
        all_responses.extend(b.responses)
    rm = reward_scores(reward_model, reward_tokenizer, texts, batch_size)
    n = len(rows)
    return PolicyEval(
        gold_score=totals["gold"] / n,
        reward_model_score=rm.mean().item(),
        kl_to_reference=totals["kl"] / n,
        response_length=totals["length"] / n,
        eos_fraction=totals["eos"] / n,
        samples=n,
        responses=all_responses,
    )


def sequence_kl(
    policy: PreTrainedModel, reference: PreTrainedModel, batch: SampledBatch, temperature: float
) -> torch.Tensor:
    """``log π(y|x) − log π_ref(y|x)`` ``(N,)`` per sampled response of ``batch`` (a single-sample
    estimate of the sequence KL; its mean over samples of ``π`` is the KL)."""
    device = next(policy.parameters()).device
    args = (
        batch.prompt_ids,
        batch.prompt_mask,
        batch.response_ids.to(device),
        batch.response_mask.to(device),
        temperature,
    )
    return sequence_logprob(policy, *args) - sequence_logprob(reference, *args)


def sequence_logprob(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``log π(response | prompt)`` ``(N,)`` summed over response tokens (mask ``(N, R)``), for
    left-padded prompts ``(N, P)`` and right-padded responses ``(N, R)``."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    hidden = response_hidden(model, input_ids, attention_mask, prompt_ids.shape[1])
    logprobs, _ = token_logprobs(model, hidden, response_ids, temperature)
    return (logprobs * response_mask).sum(-1)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams in ``texts`` (Li et al., 2016): near 1 for varied
    text, low when responses repeat themselves or each other. 0 for no n-grams."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.lower().split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_sentence_share(texts: list[str]) -> float:
    """Share of responses that repeat one of their own sentences, or a clause of three or more
    words (split at ``, ; :``), a degeneration symptom; shorter clauses ("yes, yes") do not count."""
    import re

    def repeats(text: str) -> bool:
        sentences = [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]
        if len(sentences) != len(set(sentences)):
            return True
        clauses = [c.strip().lower() for c in re.split(r"[.!?,;:]+", text) if len(c.split()) >= 3]
        return len(clauses) != len(set(clauses))

    return sum(map(repeats, texts)) / len(texts) if texts else 0.0
