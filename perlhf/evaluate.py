"""Evaluate policies the way RLHF papers do: sample, then score with the reward model and a gold scorer.

``evaluate_policy`` samples responses to held-out prompts from a policy (any ``transformers``
causal LM, e.g. a merged perlhf export) and reports the mean gold score, the frozen reward
model's score, the KL divergence to a reference policy (the SFT model RL started from), the
response length and how often the response ended with EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.data.rollout_utils import cut_at_eos, encode, left_pad, reward_scores
from perlhf.modules.policy import response_hidden, token_logprobs

__all__ = ["PolicyEval", "evaluate_policy", "reward_scores", "sequence_logprob"]


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
    device = next(policy.parameters()).device
    policy.eval()
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    totals = {"gold": 0.0, "kl": 0.0, "length": 0.0, "eos": 0.0}
    texts: list[str] = []
    all_responses: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
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
        totals["gold"] += sum(gold(p, r) for p, r in zip(chunk, responses, strict=True))
        totals["length"] += response_mask.sum().item()
        totals["eos"] += ended.sum().item()
        if reference is not None:
            args = (prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device), temperature)
            kl = sequence_logprob(policy, *args) - sequence_logprob(reference, *args)
            totals["kl"] += kl.sum().item()
        texts.extend(p + r for p, r in zip(chunk, responses, strict=True))
        all_responses.extend(responses)
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
