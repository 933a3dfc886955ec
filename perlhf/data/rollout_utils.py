"""Helpers of the rollout DataModule: prompts, padding, EOS masks, reward shaping, reward-model loading.

Tensor helpers are pure functions on hand-made tensors; ``RunningMoments`` is the running reward
normaliser's state; ``load_reward_model`` turns a perlhf/peft adapter folder or a plain Hugging
Face sequence classifier into one frozen ``transformers`` model.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils.peft_utils import find_adapter_config_file

from perlhf.data.images import combine_vision, encode_with_images, image_inputs, render_prompt
from perlhf.hub import check_model_source
from perlhf.models import DTYPES, load_tokenizer
from perlhf.scoring import sequence_scores
from perlhf.vlm import VisionRewardModel, has_reward_head

NOT_A_CLASSIFIER = (
    "reward_model={path!r} is {what}; the reward model must be a sequence classifier with a scalar "
    "head (e.g. a perlhf RewardModule export: RewardModule.save_pretrained, adapter or merged)"
)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens, but no second BOS when the text
    (e.g. rendered by a chat template) already starts with one."""
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


@dataclass
class Prompt:
    """One prompt as the policy sees it."""

    text: str
    """Rendered text (chat template applied; the kept tail when truncated)."""
    ids: list[int]
    """Policy token ids, at most ``max_prompt_length``."""
    messages: list[dict[str, str]] | None = None
    """Chat messages, so a reward model with a chat template can render the conversation itself;
    None for plain-text prompts and truncated chat prompts (the reward model then sees ``text``)."""
    truncated: bool = False
    """Whether the prompt was cut to its last ``max_prompt_length`` tokens."""
    reward_text: str | None = None
    """What the reward model scores in place of ``text`` (a string prompt that was wrapped in the
    policy's chat template: the reward model was trained on the string); None: ``text``."""
    images: list[Any] | None = None
    """The prompt's images (a VLM policy); ``reward_text`` then holds the question, which each
    model renders with its own processor and chat template."""
    row: dict[str, Any] = field(default_factory=dict)
    """The other columns of the prompt's dataset row, for reward functions."""


def join_for_reward(prompt: str, response: str) -> str:
    """``response`` as it continues a plain ``prompt`` for the reward model: with a leading space
    when the prompt ends in a non-space (``"...TL;DR:"``, ``"...Assistant:"``) and the response,
    sampled after a chat template, starts without one."""
    if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def encode_prompt(
    value: Any, tokenizer: PreTrainedTokenizerBase, max_length: int, overlong: str, where: str
) -> Prompt:
    """A prompt string, or ``{"role", "content"}`` messages rendered with the chat template and a
    generation prompt; longer than ``max_length`` tokens: ``overlong="truncate"`` keeps the last
    tokens (and a leading BOS), ``"error"`` raises. ``where`` names the row in errors."""
    messages = None
    if isinstance(value, str):
        text, empty = value, not value.strip()
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    ):
        if not tokenizer.chat_template:
            raise ValueError(
                f"{where}: chat prompts need a policy tokenizer with a chat template, and "
                f"{tokenizer.name_or_path!r} has none; give plain-text prompts or a chat model"
            )
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        empty = not any(str(m["content"] or "").strip() for m in messages)
    else:
        raise ValueError(
            f"{where}: a prompt must be a string or a list of {{'role', 'content'}} messages, "
            f"got {value!r:.80}"
        )
    if empty:
        raise ValueError(f"{where}: the prompt is empty; remove the row or fill it in")
    ids = encode(tokenizer, text)
    if len(ids) <= max_length:
        return Prompt(text, ids, messages)
    if overlong == "error":
        raise ValueError(
            f"{where}: the prompt is {len(ids)} tokens, longer than max_prompt_length="
            f"{max_length}; raise max_prompt_length or set overlong_prompt='truncate' "
            "(keeps the last tokens)"
        )
    head = ids[:1] if ids[0] == tokenizer.bos_token_id else []
    tail = ids[len(ids) - (max_length - len(head)) :]
    return Prompt(tokenizer.decode(tail, skip_special_tokens=False), head + tail, truncated=True)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(N, longest)``, padded on the left (generation continues on the right)."""
    return _pad(sequences, pad_id, "left")


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(N, longest)``, padded on the right."""
    return _pad(sequences, pad_id, "right")


def _pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side=side)
    return ids, mask


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``items``; every rank gets equally many, wrapping around (as
    ``DistributedSampler`` pads), so no rank runs out of batches before the others."""
    if world_size == 1:
        return items
    per_rank = math.ceil(len(items) / world_size)
    return [items[i % len(items)] for i in range(rank, per_rank * world_size, world_size)]


def cut_at_eos(
    responses: torch.Tensor, eos_id: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End each response at its first EOS: ``(ids, mask, ended)``.

    ``ids`` ``(N, R)`` has every token after the first EOS replaced by ``pad_id`` (whatever the
    generator put there); ``mask`` ``(N, R)`` is 1 up to and including the first EOS; ``ended``
    ``(N,)`` says whether the response emitted EOS at all.
    """
    if eos_id is None:
        return responses, torch.ones_like(responses), torch.zeros(responses.shape[0], dtype=torch.bool)
    is_eos = (responses == eos_id).long()
    after = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    return responses.masked_fill(after, pad_id), (~after).long(), is_eos.bool().any(dim=1)


@dataclass
class RunningMoments:
    """Mean and (population) standard deviation of every score seen, updated a batch at a time
    with the parallel form of Welford's algorithm (Chan et al.), in float64.

    Not a torchmetrics ``Metric``: every rank must hold the same statistics at every step (each
    normalises its scores with them, and a checkpoint stores rank 0's copy), so callers update it
    with all ranks' scores (``shape_rewards(gather=...)``); a ``Metric`` keeps rank-local states and
    syncs them only inside ``compute``."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_rewards(
    raw: torch.Tensor,
    ended: torch.Tensor,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
    moments: RunningMoments | None = None,
    update: bool = True,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores ``(N,)`` from raw reward-model outputs, and what was done to them.

    In order: add ``missing_eos_penalty`` to responses that never emitted EOS; with ``moments``,
    fold the scores into the running statistics (if ``update``) and normalise them to zero mean
    and unit std; clamp to ``±clip``. Without ``moments`` or before any update, no normalisation.
    ``gather`` maps this rank's scores ``(N,)`` to every rank's ``(world*N,)``: the running
    statistics then see all ranks' scores, so every rank normalises identically.
    """
    scores = raw.double()
    stats: dict[str, float] = {}  # the raw reward itself is the batch's raw_scores
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores + missing_eos_penalty)
        stats["reward/penalised_fraction"] = (~ended).float().mean().item()
    if moments is not None:
        if update:
            moments.update(gather(scores) if gather is not None else scores)
        if moments.count:
            scores = (scores - moments.mean) / max(moments.std, 1e-8)
        stats["reward/running_mean"], stats["reward/running_std"] = moments.mean, moments.std
    if clip is not None:
        stats["reward/clipped_fraction"] = (scores.abs() > clip).float().mean().item()
        scores = scores.clamp(-clip, clip)
    stats["reward/shaped_mean"] = scores.mean().item()
    return scores.float(), stats


@torch.no_grad()
def reward_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Scalar scores ``(N,)`` float32 (CPU) of a sequence classifier on ``texts`` (the last tokens
    that fit the model's positions), padded as the tokenizer pads (any side, any pad id: the
    scores do not depend on it)."""
    sequences = [encode(tokenizer, text) for text in texts]
    limit = max_positions(model)
    if limit is not None:
        sequences = [ids[-limit:] for ids in sequences]
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = [{"input_ids": ids} for ids in sequences[start : start + batch_size]]
        padded = tokenizer.pad(chunk, return_tensors="pt")
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        scores.append(sequence_scores(model, ids, mask).cpu())
    return torch.cat(scores)


def max_positions(model: PreTrainedModel) -> int | None:
    """Longest sequence the model's position embeddings allow, when the config says."""
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def vision_reward_scores(
    model: VisionRewardModel,
    processor: Any,
    questions: list[str],
    images: list[list[Any]],
    responses: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Scores ``(N,)`` float32 (CPU) of a VLM reward model: each question + images rendered with
    ``processor``'s chat template, as ``PreferenceDataModule`` renders them, then the response."""
    device = next(model.parameters()).device
    sequences, parts = [], []
    for question, row_images, response in zip(questions, images, responses, strict=True):
        text = render_prompt(processor, question, len(row_images))
        prompt = encode_with_images(processor, text, row_images)
        sequences.append(prompt + processor.tokenizer(response, add_special_tokens=False)["input_ids"])
        parts.append(image_inputs(processor, row_images) if row_images else None)
    scores = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = right_pad(sequences[start : start + batch_size], processor.tokenizer.pad_token_id)
        vision = {k: v.to(device) for k, v in combine_vision(parts[start : start + batch_size]).items()}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **vision).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores)


def headless_classifier(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A one-label sequence classifier on the base model of a reward adapter, whose ``score`` head
    the adapter brings. The base checkpoint (a causal LM) has no head by design, so transformers'
    load report about it (``score.weight | MISSING``) is silenced; any other missing weight is
    still reported, as a warning."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, output_loading_info=True, **kwargs
        )
    finally:
        log.setLevel(level)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing:
        warnings.warn(
            f"reward base {name_or_path!r} lacks weights {missing[:5]} (newly initialised); is it "
            "the model the reward adapter was trained on? (reward_base)",
            stacklevel=2,
        )
    return model


def load_reward_model(
    name_or_path: str,
    base: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    what: str = "reward_model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen, eval-mode sequence classifier and its tokenizer (for a VLM reward model, a
    ``VisionRewardModel`` export, its processor).

    ``name_or_path`` is a peft adapter folder or hub id (``adapter_config.json``, task ``SEQ_CLS``:
    loaded onto ``base`` or the adapter's ``base_model_name_or_path`` and merged) or a plain
    ``*ForSequenceClassification`` model. The tokenizer comes from ``name_or_path``, else the base.
    ``what`` is the config key of ``name_or_path``, named in errors.
    """
    check_model_source(name_or_path, what)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if has_reward_head(name_or_path):  # a VLM reward model: trunk + head, processor as "tokenizer"
        from perlhf.data.images import load_processor

        model = VisionRewardModel.from_pretrained(name_or_path, base, **kwargs)
        return model.requires_grad_(False).eval(), load_processor(name_or_path, trust_remote_code)
    if find_adapter_config_file(name_or_path) is not None:
        from peft import PeftConfig, PeftModel

        adapter = PeftConfig.from_pretrained(name_or_path)
        task = getattr(adapter.task_type, "value", adapter.task_type)
        if task != "SEQ_CLS":
            what = f"a peft adapter of task {task!r}"
            raise ValueError(NOT_A_CLASSIFIER.format(path=name_or_path, what=what))
        base = base or adapter.base_model_name_or_path
        if not base:
            raise ValueError(
                f"reward_model={name_or_path!r} is an adapter that names no base model; set reward_base"
            )
        check_model_source(base, "reward_base (or the reward adapter's base_model_name_or_path)")
        model = PeftModel.from_pretrained(
            headless_classifier(base, **kwargs), name_or_path
        ).merge_and_unload()
        try:
            tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        except (OSError, ValueError):
            tokenizer = load_tokenizer(base, trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            what = f"a {'/'.join(architectures) or 'model of unknown architecture'} (config.architectures)"
            raise ValueError(NOT_A_CLASSIFIER.format(path=name_or_path, what=what))
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    # Sequence classifiers pool the score at the last non-pad token, so the ids must agree.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # scoring one pass: a KV cache would only cost memory
    model.requires_grad_(False).eval()
    return model, tokenizer
