"""Use trained perlhf exports without a Trainer: score texts with a reward model, sample a policy.

``RewardModel.from_pretrained(export)`` loads a ``RewardModule`` export (peft adapter or merged,
or any Hugging Face sequence classifier) and scores ``(prompt, response)`` pairs;
``Policy.from_pretrained(export)`` loads a ``PPOModule`` / ``SFTModule`` export (adapter or
merged, or any causal LM) and samples responses. Both are thin: ``.model`` and ``.tokenizer`` are
the plain ``transformers`` objects.

Scores come from ``perlhf.scoring.sequence_scores``, as in training, so they depend on neither
the padding side nor the pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.peft_utils import find_adapter_config_file

from perlhf.data.rollout_utils import (
    cut_at_eos,
    encode,
    left_pad,
    load_reward_model,
    vision_reward_scores,
)
from perlhf.models import DTYPES, load_tokenizer
from perlhf.rewards import RewardModelScorer
from perlhf.vlm import VisionRewardModel


class RewardModel:
    """A frozen reward model for inference: ``RewardModel.from_pretrained(export).score(prompts,
    responses)``. It is also a ``perlhf.rewards.Reward`` (callable with ``rows``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: str | None = None,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """Load a ``RewardModule`` export (adapter folder, merged model, or a VLM reward model) or
        any Hugging Face sequence classifier. ``base``: an adapter's base model when its
        ``adapter_config.json`` does not name a reachable one."""
        model, tokenizer = load_reward_model(str(path), base, dtype, trust_remote_code)
        return cls(model.to(device) if device is not None else model, tokenizer, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        images: Sequence[list[Any]] | None = None,
    ) -> torch.Tensor:
        """Scores ``(N,)`` float32 (CPU) of ``prompts[i] + responses[i]`` (joined as given: add
        the separator your reward data used). A VLM reward model also needs each prompt's
        ``images``."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        if isinstance(self.model, VisionRewardModel):
            if images is None:
                raise ValueError("score: this is a vision-language reward model; pass images=")
            return vision_reward_scores(
                self.model, self.tokenizer, list(prompts), list(images), list(responses), self.batch_size
            )
        return self(list(prompts), list(responses), [{} for _ in prompts])

    def __call__(
        self, prompts: list[str], responses: list[str], rows: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        return RewardModelScorer(self.model, self.tokenizer, self.batch_size)(prompts, responses, rows)


class Policy:
    """A policy for inference: ``Policy.from_pretrained(export).generate(prompts)``."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: str | None = None,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> Policy:
        """Load a ``PPOModule`` export (its ``policy`` adapter, merged onto the base it names, or
        ``merged/``), an ``SFTModule`` export, or any causal LM folder or hub id."""
        path = str(path)
        adapter = _policy_adapter(path)
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
        if adapter is None:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            from peft import PeftConfig

            base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
            if not base:
                raise ValueError(f"policy adapter {adapter!r} names no base model; pass base=")
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        try:
            tokenizer = load_tokenizer(path, trust_remote_code)
        except (OSError, ValueError):
            tokenizer = load_tokenizer(base or path, trust_remote_code)
        return cls(model.to(device) if device is not None else model, tokenizer)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        do_sample: bool = True,
        **kwargs: Any,
    ) -> list[str]:
        """Responses to ``prompts`` (texts, as the policy saw them in training), decoded without
        special tokens and cut at the first EOS; ``kwargs`` go to ``generate`` (``top_p``…)."""
        tok = self.tokenizer
        ids, mask = left_pad([encode(tok, p) for p in prompts], tok.pad_token_id)  # (N, P)
        device = next(self.model.parameters()).device
        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **sampling | kwargs,
        )
        response_ids, _, _ = cut_at_eos(out[:, ids.shape[1] :].cpu(), tok.eos_token_id, tok.pad_token_id)
        return tok.batch_decode(response_ids, skip_special_tokens=True)


def _policy_adapter(path: str) -> str | None:
    """The peft adapter folder of a policy export (``<path>/policy`` for a ``PPOModule`` export,
    ``<path>`` for an ``SFTModule`` one), or None for a full model."""
    if Path(path).is_dir():
        found = (p for p in (Path(path) / "policy", Path(path)) if (p / "adapter_config.json").is_file())
        return next((str(p) for p in found), None)
    return path if find_adapter_config_file(path) is not None else None
