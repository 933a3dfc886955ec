"""On-policy experience for RL: prompts in, scored samples of the policy under training out.

``RolloutDataModule`` owns the prompts and the frozen reward model. Its datasets are
``IterableDataset``s wrapping a generator (as in Lightning's RL examples): each item is made when
the loop asks for it, by calling ``generate`` on the LightningModule being trained, decoding the
responses, re-tokenising prompt + response for the reward model (policy and reward model may use
different tokenizers) and scoring them. The train dataset has a length (``rollouts_per_epoch``),
which stops Lightning from prefetching a batch: every rollout is sampled from the current weights.

The prompt stream is a pure function of ``(seed, rollouts drawn so far)`` — passes over the
prompt set, each in an order drawn from ``(seed, pass)`` — and the count is checkpointed with
the running reward statistics, so a resumed run continues the same stream.

Prompts come from a prompt column, or from a preference dataset in one of the pairwise formats
of ``perlhf.data.formats`` (the reward model's own training data): each row is reduced to the
prompt the reward model saw in training.

Prompts may carry images (an image column, ``format="prompt"``): the policy, a VLM, renders
each question + images with its processor and generates from their pixel inputs (batches carry
them per row under ``prompt_vision``), and a VLM reward model re-renders the same question +
images with its own processor to score the response.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as L
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.data.formats import (
    CANONICAL,
    FORMATS,
    OPTIONAL,
    PAIRWISE,
    RowError,
    prompt_messages,
    prompt_of,
)
from perlhf.data.images import (
    combine_vision,
    data_image_root,
    encode_with_images,
    find_image_column,
    image_inputs,
    load_processor,
    render_prompt,
    row_images,
    undecoded,
)
from perlhf.data.loading import (
    Splits,
    in_memory_dataset,
    load_dataset_dict,
    tokenizer_name_from,
    train_val_splits,
)
from perlhf.data.rollout_utils import (
    Prompt,
    RunningMoments,
    cut_at_eos,
    encode_prompt,
    join_for_reward,
    left_pad,
    load_reward_model,
    shape_rewards,
    shard,
    vision_reward_scores,
)
from perlhf.data.sampler import EpochSeededSampler
from perlhf.models import DTYPES, load_tokenizer
from perlhf.rewards import FunctionReward, Reward, RewardFunction, RewardModelScorer, weighted_sum
from perlhf.vlm import VisionRewardModel

Batch = dict[str, Any]
PromptFormat = Literal["prompt", "explicit", "implicit", "conversational", "scored", "tldr"]


class RolloutDataset(IterableDataset):
    """``length`` items, each made by ``make(i)`` only when the iterator reaches it: a rollout
    source that keeps RL on-policy (``perlhf.contracts``)."""

    def __init__(self, make: Callable[[int], Batch], length: int) -> None:
        self.make, self.length = make, length

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.length):
            yield self.make(i)

    def __len__(self) -> int:
        return self.length


class RolloutDataModule(L.LightningDataModule):
    """Rollout batches sampled from the LightningModule under training and scored by its rewards: a
    frozen reward model, Python reward functions (``perlhf.rewards``), or a weighted sum of them.

    Each batch (a ``perlhf.RolloutBatch``) holds ``N = prompts_per_rollout * samples_per_prompt``
    rows, prompt-major (the samples of prompt ``p`` are rows ``p*k … p*k+k-1``):
    ``prompt_ids``/``prompt_mask`` ``(N, P)``
    left-padded; ``response_ids``/``response_mask`` ``(N, R)`` right-padded, the mask 1 up to and
    including the first EOS; ``scores`` and ``raw_scores`` ``(N,)`` float32; ``ended_with_eos``
    ``(N,)`` bool; ``prompts``/``responses`` texts; ``stats`` floats for logging (each reward
    component's mean under ``reward/<name>``). Image prompts
    add ``prompt_vision`` (per row, the image inputs of ``generate``; join rows with
    ``perlhf.data.images.combine_vision``) and ``images`` (per row, the PIL images).

    The LightningModule must provide ``tokenizer_name_or_path``, ``device`` and
    ``generate(prompt_ids, prompt_mask, **generation_kwargs) -> (N, R)`` response tokens.

    Args:
        path: Hub id, local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, local folder, or
            builder name (``json``, ``parquet``, ``csv``) used with ``data_files``; or the prompts
            themselves: a list (strings, chat message lists, or row dicts) or a dict of split
            name -> list.
        reward_model: Reward model folder or hub id: a perlhf/peft ``SEQ_CLS`` adapter (merged onto
            its base on load) or any Hugging Face ``*ForSequenceClassification`` model. None: the
            reward is ``reward_functions`` alone.
        reward_functions: Python reward functions by import path, each with a weight
            (``RewardFunction``); they get the prompt string, the response and the prompt row's
            other columns. The score is ``reward_weight · reward model + Σ weight · function``.
        reward_weight: Weight of the reward model in the sum.
        data_files: Files for ``load_dataset``; a dict maps split names to files.
        name: Dataset configuration name.
        data_dir: Sub-folder of the dataset to load.
        train_split: Split whose prompts are sampled for training.
        val_split: Split of held-out prompts; None or absent: ``val_fraction`` of the train split.
        val_fraction: Share of the train split held out when there is no validation split.
        format: ``prompt``: a prompt column (``prompt_column``). A pairwise preference format
            (``explicit``, ``implicit``, ``conversational``, ``scored``, ``tldr``; see
            ``PreferenceDataModule``): each row's prompt, rendered as for the reward model;
            ``conversational`` keeps the messages, so the reward model renders them with its own
            chat template. Rows are not de-duplicated: a prompt shared by several rows (HH-RLHF
            first turns, SHP posts with several comment pairs, TL;DR posts with several
            comparisons) is drawn once per row, so proportionally more often.
        columns: Canonical column name -> dataset column name for the preference formats.
        response_marker: Text that opens the reply in ``implicit`` transcripts.
        prompt_column: Column holding a prompt string or a list of ``{"role", "content"}``
            messages (rendered with the policy tokenizer's chat template, generation prompt added);
            ``format="prompt"`` only.
        apply_chat_template: Wrap string prompts (stripped) in a user message rendered with the
            policy tokenizer's chat template, as instruct policies expect. The reward model still
            scores the original string + response, as it was trained on that format's strings
            (with a space between them when the string ends in a non-space and the response
            starts with one); a reward model trained on chat messages wants message prompts
            (``conversational`` format or message lists) instead.
        max_prompt_length: Maximum prompt tokens (policy tokenizer).
        overlong_prompt: Longer prompts: ``truncate`` (keep the last tokens) or ``error``.
        max_train_prompts: Use at most this many training prompts.
        max_val_prompts: Use at most this many held-out prompts.
        tokenizer: Policy tokenizer; None: the LightningModule's ``tokenizer_name_or_path``.
        reward_base: Base model of an adapter ``reward_model``; None: the adapter's own record.
        reward_dtype: Dtype the reward model is loaded in.
        reward_trust_remote_code: Run modelling code shipped with the reward model.
        reward_batch_size: Sequences per reward-model forward pass.
        prompts_per_rollout: Distinct prompts per rollout batch (and per validation batch).
        samples_per_prompt: Responses sampled per prompt (``k``, e.g. for group baselines).
        rollouts_per_epoch: Rollout batches per training epoch.
        max_new_tokens: Maximum response tokens.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold (1: off). Log-probs stay those of the untruncated
            policy, so values below 1 make sampling slightly off-policy (a warning says so).
        top_k: Top-k sampling (0: off); truncates like ``top_p``. Nothing else of the
            checkpoint's ``generation_config`` (repetition penalty…) reaches the sampler.
        stop_at_eos: Stop generating at EOS. Responses are cut at their first EOS either way.
        missing_eos_penalty: Added to the score of responses that never emitted EOS.
        reward_clip: Clamp scores to ``±reward_clip`` (after normalisation).
        normalize_rewards: Normalise scores with the running mean/std of every training score so
            far, on all ranks (validation uses the statistics without updating them).
        seed: Seed of the prompt order, the validation hold-out and validation sampling.
        image_column: Column of each prompt's images (file paths, image bytes or PIL images; see
            ``PreferenceDataModule``); None: ``images`` or ``image`` when the data has one.
            ``format="prompt"`` only; the policy must be a VLM (its processor encodes them).
        image_root: Folder that image paths in the prompts are relative to and confined to; None:
            the folder of the local data files (else the working directory).
        allow_images_outside_root: Read image paths outside ``image_root`` too (trusted data only).
    """

    def __init__(
        self,
        path: str | list[Any] | dict[str, list[Any]],
        reward_model: str | None = None,
        reward_functions: list[RewardFunction] | None = None,
        reward_weight: float = 1.0,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        name: str | None = None,
        data_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_fraction: float = 0.05,
        format: PromptFormat = "prompt",
        columns: dict[str, str] | None = None,
        response_marker: str = "\n\nAssistant:",
        prompt_column: str = "prompt",
        apply_chat_template: bool = False,
        max_prompt_length: int = 256,
        overlong_prompt: Literal["error", "truncate"] = "truncate",
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = None,
        tokenizer: str | None = None,
        reward_base: str | None = None,
        reward_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        reward_trust_remote_code: bool = False,
        reward_batch_size: int = 64,
        prompts_per_rollout: int = 16,
        samples_per_prompt: int = 1,
        rollouts_per_epoch: int = 8,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_at_eos: bool = True,
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        normalize_rewards: bool = False,
        seed: int = 0,
        image_column: str | None = None,
        image_root: str | None = None,
        allow_images_outside_root: bool = False,
    ) -> None:
        super().__init__()
        positive = {
            "max_prompt_length": max_prompt_length,
            "reward_batch_size": reward_batch_size,
            "prompts_per_rollout": prompts_per_rollout,
            "samples_per_prompt": samples_per_prompt,
            "rollouts_per_epoch": rollouts_per_epoch,
            "max_new_tokens": max_new_tokens,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        if overlong_prompt not in ("error", "truncate"):
            raise ValueError(f"overlong_prompt must be 'error' or 'truncate', got {overlong_prompt!r}")
        if reward_dtype not in DTYPES:
            raise ValueError(f"reward_dtype must be one of {sorted(DTYPES)}, got {reward_dtype!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if temperature <= 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(
                f"need temperature > 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, {top_p}, {top_k}"
            )
        if top_p < 1.0 or top_k > 0:
            rank_zero_warn(
                f"top_p={top_p}, top_k={top_k} truncate the sampling distribution, while the policy "
                "being optimised (training and KL log-probs) is the full softmax(logits / temperature): "
                "the samples are then slightly off-policy; keep top_p=1, top_k=0 for exact on-policy RL"
            )
        if reward_clip is not None and reward_clip <= 0:
            raise ValueError(f"reward_clip must be positive, got {reward_clip}")
        if format not in ("prompt", *PAIRWISE):
            raise ValueError(f"format must be one of {['prompt', *PAIRWISE]}, got {format!r}")
        if format == "prompt" and columns:
            raise ValueError("columns maps preference-format columns; with format='prompt' set prompt_column")
        if format != "prompt" and prompt_column != "prompt":
            raise ValueError(
                f"prompt_column is for format='prompt'; with format={format!r} map columns with "
                "columns={'<canonical>': '<column>'}"
            )
        if reward_model is None and not reward_functions:
            raise ValueError("RolloutDataModule needs a reward: set reward_model, reward_functions or both")
        unknown = sorted(set(columns or {}) - CANONICAL)
        if unknown:
            raise ValueError(
                f"columns keys {unknown} are not canonical column names; the keys are canonical "
                f"names ({sorted(CANONICAL)}), the values dataset columns"
            )
        self.save_hyperparameters()
        self.path, self.data_files, self.name, self.data_dir = path, data_files, name, data_dir
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.format, self.columns, self.response_marker = format, dict(columns or {}), response_marker
        self.prompt_column, self.apply_chat_template = prompt_column, apply_chat_template
        self.max_prompt_length, self.overlong_prompt = max_prompt_length, overlong_prompt
        self.max_prompts = {"train": max_train_prompts, "val": max_val_prompts}
        self.tokenizer_name = tokenizer
        self.reward_model_name, self.reward_base = reward_model, reward_base
        self.reward_dtype, self.reward_trust_remote_code = reward_dtype, reward_trust_remote_code
        self.reward_batch_size = reward_batch_size
        self.reward_functions = [
            f if isinstance(f, RewardFunction) else RewardFunction(**f) for f in reward_functions or []
        ]
        self.reward_weight = reward_weight
        self.rewards: dict[str, tuple[float, Reward]] = {}  # name -> (weight, reward); setup() fills it
        self.prompts_per_rollout, self.samples_per_prompt = prompts_per_rollout, samples_per_prompt
        self.rollouts_per_epoch = rollouts_per_epoch
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.stop_at_eos = stop_at_eos
        self.missing_eos_penalty, self.reward_clip = missing_eos_penalty, reward_clip
        self.seed = seed
        self.image_column = image_column
        self.image_root, self.allow_images_outside_root = image_root, allow_images_outside_root
        self.processor = None  # the VLM policy's processor, loaded for image prompts
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.reward_model: PreTrainedModel | None = None  # owned here, never a LightningModule submodule
        self.reward_tokenizer: PreTrainedTokenizerBase | None = None
        self.prompts: dict[str, list[Prompt]] = {}
        self.num_truncated: dict[str, int] = {}
        self.rollouts_drawn = 0
        self.moments = RunningMoments() if normalize_rewards else None
        self._order: tuple[int, list[int]] = (-1, [])

    # ----------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            name, key = tokenizer_name_from(self, self.tokenizer_name, "policy tokenizer")
            self.tokenizer = load_tokenizer(name, what=key)
        if self.apply_chat_template and not self.tokenizer.chat_template:
            raise ValueError(
                f"apply_chat_template=True needs a policy tokenizer with a chat template, and "
                f"{self.tokenizer.name_or_path!r} has none; set it to False or use a chat model"
            )
        if self.reward_model is None and self.reward_model_name is not None:
            self.reward_model, self.reward_tokenizer = load_reward_model(
                self.reward_model_name,
                self.reward_base,
                self.reward_dtype,
                self.reward_trust_remote_code,
                what="data.init_args.reward_model",
            )
        if not self.rewards:
            if self.reward_model is not None:
                scorer = RewardModelScorer(self.reward_model, self.reward_tokenizer, self.reward_batch_size)
                self.rewards[scorer.name] = (self.reward_weight, scorer)
            for spec in self.reward_functions:
                reward = FunctionReward(spec.function, spec.name, **spec.kwargs)
                if reward.name in self.rewards:
                    raise ValueError(
                        f"two rewards are named {reward.name!r}; give reward_functions a name each"
                    )
                self.rewards[reward.name] = (spec.weight, reward)
        if not self.prompts:
            for key, (split, dataset, row_ids) in self._splits().items():
                self.prompts[key] = self._encode_split(key, split, dataset, row_ids)

    def _splits(self) -> Splits:
        where = self.path
        if isinstance(self.path, list | dict):  # prompts given in Python
            raw, where = in_memory_dataset(self.path, self.prompt_column), "prompts"
        else:
            raw = load_dataset_dict(self.path, self.data_files, self.name, self.data_dir, "prompt dataset")
        return train_val_splits(
            raw, where, self.train_split, self.val_split, self.val_fraction, self.seed, self.max_prompts
        )

    def _encode_split(
        self, key: str, split: str, dataset: Dataset, row_ids: list[int] | None
    ) -> list[Prompt]:
        source = self._source(split)
        if len(dataset) == 0:
            raise ValueError(f"{source} has no prompts for {key}")
        prompts = []
        for value, where, images in self._prompt_values(source, dataset, row_ids):
            prompts.append(self._encode(value, where, images))
        used = (
            {self.prompt_column, self.image_column, "images", "image"} if self.format == "prompt" else set()
        )
        extra = [c for c in dataset.column_names if c not in used]
        if self.reward_functions and extra:  # what reward functions get as keyword arguments
            for prompt, row in zip(prompts, dataset.select_columns(extra), strict=True):
                prompt.row = row
        self.num_truncated[key] = sum(p.truncated for p in prompts)
        rank_zero_info(
            f"{source} ({key}): {len(prompts)} prompts, {self.num_truncated[key]} "
            f"truncated to their last max_prompt_length={self.max_prompt_length} tokens"
        )
        return prompts

    def _prompt_values(
        self, source: str, dataset: Dataset, row_ids: list[int] | None
    ) -> Iterator[tuple[Any, str, list | None]]:
        """``(prompt string or messages, where, images or None)`` per row; ``where`` names the row
        in errors."""
        found = dataset.column_names
        if self.format == "prompt":
            if self.prompt_column not in found:
                raise ValueError(
                    f"{source} has no column {self.prompt_column!r} (prompt_column); columns: {found}"
                )
            image_column = find_image_column(found, self.image_column, source)
            if image_column is not None and self.processor is None:
                self.processor = load_processor(self.tokenizer.name_or_path)
                self.tokenizer = self.processor.tokenizer
            column_images = undecoded(dataset, image_column)[image_column] if image_column else None
            root = data_image_root(self.image_root, self.path, self.data_files)
            for index, value in enumerate(dataset[self.prompt_column]):
                row = index if row_ids is None else row_ids[index]
                images = None
                if column_images is not None:
                    where = f"{source} row {row}, column {image_column!r}"
                    images = row_images(column_images[index], where, root, self.allow_images_outside_root)
                yield value, f"{source} row {row}, column {self.prompt_column!r}", images
            return
        if self.image_column is not None:
            raise ValueError(
                f"image_column is for format='prompt' (a question column); got format={self.format!r}"
            )
        view = self._resolve_columns(source, found)
        for index, record in enumerate(dataset.select_columns(list(dict.fromkeys(view.values())))):
            row = index if row_ids is None else row_ids[index]
            canonical = {name: record[column] for name, column in view.items()}
            try:
                if self.format == "conversational":
                    value: Any = prompt_messages(canonical)
                else:
                    value = prompt_of(self.format, canonical, response_marker=self.response_marker)
            except RowError as err:
                column = view[err.column]
                mapped = "" if column == err.column else f" (dataset column {column!r})"
                raise ValueError(f"{source} row {row}: {err}{mapped}") from None
            yield value, f"{source} row {row} (format {self.format!r})", None

    def _resolve_columns(self, source: str, found: list[str]) -> dict[str, str]:
        """Canonical name -> dataset column of the columns the format reads."""
        for canonical, column in self.columns.items():
            if column not in found:
                raise ValueError(
                    f"{source}: columns={{{canonical!r}: {column!r}}} names a missing column; "
                    f"columns found: {found}"
                )
        view = {**{c: c for c in found if c in CANONICAL}, **self.columns}
        for column in FORMATS[self.format]:
            if column not in view:
                raise ValueError(
                    f"{source}: format {self.format!r} needs column {column!r}, which is missing; "
                    f"columns found: {found}; map one with columns={{{column!r}: '<column>'}}"
                )
        wanted = [c for c in FORMATS[self.format] + OPTIONAL[self.format] if c != "margin"]
        return {c: view[c] for c in wanted if c in view}

    def _encode(self, value: Any, where: str, images: list | None = None) -> Prompt:
        """Encode one prompt; with ``apply_chat_template`` a string becomes a chat user turn for the
        policy, while the reward model keeps scoring the string itself. A prompt with ``images`` is
        a question rendered with the VLM's processor (never truncated: image tokens must match)."""
        if images is not None:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: an image prompt must be a non-empty question string, got {value!r:.80}"
                )
            text = render_prompt(self.processor, value, len(images))
            ids = encode_with_images(self.processor, text, images)
            if len(ids) > self.max_prompt_length:
                raise ValueError(
                    f"{where}: the prompt with its image tokens is {len(ids)} tokens, longer than "
                    f"max_prompt_length={self.max_prompt_length} (image prompts cannot be truncated); "
                    "raise max_prompt_length"
                )
            return Prompt(text, ids, reward_text=value, images=images)
        wrap = self.apply_chat_template and isinstance(value, str)
        chat = [{"role": "user", "content": value.strip()}] if wrap else value
        prompt = encode_prompt(chat, self.tokenizer, self.max_prompt_length, self.overlong_prompt, where)
        if wrap:
            prompt.messages, prompt.reward_text = None, value
        return prompt

    def _source(self, split: str) -> str:
        """``file[split]`` (or ``path[split]``) for messages that point at a row."""
        if isinstance(self.path, list | dict):
            return f"prompts[{split}]"
        files = self.data_files.get(split) if isinstance(self.data_files, dict) else self.data_files
        return f"{files if isinstance(files, str) else self.path}[{split}]"

    # ----------------------------------------------------------- dataloaders

    def train_dataloader(self) -> DataLoader:
        return self._loader(RolloutDataset(self._train_rollout, self.rollouts_per_epoch))

    def val_dataloader(self) -> DataLoader:
        n_batches = math.ceil(len(self._val_shard()) / self.prompts_per_rollout)
        return self._loader(RolloutDataset(self._val_rollout, n_batches))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset: RolloutDataset) -> DataLoader:
        if not self.prompts:
            raise RuntimeError("RolloutDataModule has no prompts yet; call setup() first")
        # Generation runs on the accelerator, in the main process.
        return DataLoader(dataset, batch_size=None, num_workers=0, generator=torch.Generator())

    def _train_rollout(self, _: int) -> Batch:
        prompts = [self.prompts["train"][i] for i in self.train_indices(self.rollouts_drawn)]
        batch = self._rollout([p for p in prompts for _ in range(self.samples_per_prompt)], train=True)
        self.rollouts_drawn += 1
        return batch

    def _val_rollout(self, index: int) -> Batch:
        prompts = self._val_shard()[index * self.prompts_per_rollout : (index + 1) * self.prompts_per_rollout]
        # The same sampling noise at every validation, so val rewards compare across epochs.
        device = self._device()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(self.seed * 100_003 + index)
            return self._rollout(prompts, train=False)

    def train_indices(self, rollout: int) -> list[int]:
        """Training-prompt indices of rollout number ``rollout`` on this rank.

        The stream is every prompt once per pass, each pass in an order drawn from ``(seed, pass)``;
        rollout ``c`` on rank ``r`` of ``w`` takes stream positions ``(c*w + r)*P … +P``.
        """
        n, size = len(self.prompts["train"]), self.prompts_per_rollout
        rank, world = self._rank()
        start = (rollout * world + rank) * size
        indices = []
        for position in range(start, start + size):
            epoch, i = divmod(position, n)
            if self._order[0] != epoch:
                sampler = EpochSeededSampler(range(n), seed=self.seed)
                sampler.set_epoch(epoch)
                self._order = (epoch, list(sampler))
            indices.append(self._order[1][i])
        return indices

    def _val_shard(self) -> list[Prompt]:
        return shard(self.prompts["val"], *self._rank())

    # --------------------------------------------------------------- rollouts

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``module.generate`` (sampling for training and validation alike)."""
        eos_token_id = self.tokenizer.eos_token_id if self.stop_at_eos else None
        return dict(
            self.sampling, do_sample=True, eos_token_id=eos_token_id, pad_token_id=self.tokenizer.pad_token_id
        )

    def _rollout(self, prompts: list[Prompt], train: bool) -> Batch:
        module, tok = self._module(), self.tokenizer
        prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], tok.pad_token_id)  # (N, P)
        vision = self._prompt_vision(prompts)
        start = time.perf_counter()
        pixels = {k: v.to(module.device) for k, v in combine_vision(vision or []).items()}
        generated = module.generate(
            prompt_ids.to(module.device), prompt_mask.to(module.device), **pixels, **self.generation_kwargs()
        )
        generated = generated.long().cpu()  # (N, R); .cpu() waits for the device
        generate_s = time.perf_counter() - start
        response_ids, response_mask, ended = cut_at_eos(generated, tok.eos_token_id, tok.pad_token_id)
        responses = tok.batch_decode(response_ids, skip_special_tokens=True)
        texts = [p.text for p in prompts]
        start = time.perf_counter()
        raw, reward_stats = self._rewards(prompts, responses, images=vision is not None)
        score_s = time.perf_counter() - start
        scores, stats = shape_rewards(
            raw,
            ended,
            self.missing_eos_penalty,
            self.reward_clip,
            self.moments,
            update=train,
            gather=self._all_ranks,
        )
        stats.update(reward_stats)
        stats.update(
            {
                "rollout/generate_s": generate_s,
                "rollout/score_s": score_s,
                "rollout/generated_tokens": float(response_mask.sum()),
                "rollout/response_length": response_mask.sum(dim=1).float().mean().item(),
            }
        )
        extra = {} if vision is None else {"prompt_vision": vision, "images": [p.images for p in prompts]}
        return extra | {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "scores": scores,
            "raw_scores": raw,
            "ended_with_eos": ended,
            "samples_per_prompt": self.samples_per_prompt if train else 1,
            "prompts": texts,
            "responses": responses,
            "stats": stats,
        }

    def _prompt_vision(self, prompts: list[Prompt]) -> list[dict[str, torch.Tensor] | None] | None:
        """Per row, the image inputs of an image prompt (None for a text prompt); None if no row
        has images. Rows repeating a prompt share its tensors."""
        if all(p.images is None for p in prompts):
            return None
        cache: dict[int, dict[str, torch.Tensor] | None] = {}
        for p in prompts:
            if id(p) not in cache:
                cache[id(p)] = image_inputs(self.processor, p.images) if p.images else None
        return [cache[id(p)] for p in prompts]

    def _score_images(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """Scores of image-prompt responses by the VLM reward model (its own processor renders
        question + images, as in its training data)."""
        if not isinstance(self.reward_model, VisionRewardModel):
            raise ValueError(
                f"the prompts carry images but reward_model={self.reward_model_name!r} is a text "
                "model; use a VLM reward model (a RewardModule export on a vision-language backbone)"
            )
        device = self._device()
        if next(self.reward_model.parameters()).device != device:
            self.reward_model.to(device)
        questions = [p.reward_text for p in prompts]
        return vision_reward_scores(
            self.reward_model,
            self.reward_tokenizer,
            questions,
            [p.images or [] for p in prompts],
            responses,
            self.reward_batch_size,
        )

    def _rewards(
        self, prompts: list[Prompt], responses: list[str], images: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum ``(N,)`` of every reward's scores, and each one's mean for logging.

        The reward model scores what it was trained on (``reward_text`` joined to the response,
        chat messages, or, for image prompts, question + images through its processor); reward
        functions get the prompt string, the response and the prompt row's other columns."""
        parts = {}
        for name, (_, reward) in self.rewards.items():
            if not isinstance(reward, RewardModelScorer):
                strings = [p.text if p.reward_text is None else p.reward_text for p in prompts]
                parts[name] = reward(strings, responses, [p.row for p in prompts])
            elif images:
                parts[name] = self._score_images(prompts, responses)
            else:
                pairs = [
                    (p.text, r)
                    if p.reward_text is None
                    else (p.reward_text, join_for_reward(p.reward_text, r))
                    for p, r in zip(prompts, responses, strict=True)
                ]
                rows = [{"messages": p.messages} for p in prompts]
                parts[name] = self._score([a for a, _ in pairs], [b for _, b in pairs], rows)
        return weighted_sum(parts, {name: weight for name, (weight, _) in self.rewards.items()})

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Raw reward-model scores ``(N,)`` float32 (CPU) of ``prompts[i] + responses[i]``."""
        if self.reward_model is None:
            raise RuntimeError(
                "RolloutDataModule has no reward model (yet); set reward_model and call setup()"
            )
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return self._score(prompts, responses, [{}] * len(prompts))

    def _score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> torch.Tensor:
        """The reward model's scores (``RewardModelScorer``), on this module's device."""
        device = self._device()
        if self.reward_model.device != device:
            self.reward_model.to(device)
        return self.rewards[RewardModelScorer.name][1](prompts, responses, rows)

    # ------------------------------------------------------------ plumbing

    def _module(self, required: bool = True) -> Any:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if module is None and required:
            raise RuntimeError(
                "RolloutDataModule samples from the LightningModule under training; attach it "
                "to a Trainer (trainer.fit(module, datamodule=...))"
            )
        return module

    def _device(self) -> torch.device:
        module = self._module(required=False)
        return torch.device(module.device) if module is not None else torch.device("cpu")

    def _all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` ``(N,)`` concatenated in rank order ``(world*N,)``: what the
        running reward statistics are updated with, so all ranks normalise identically."""
        if self._rank()[1] == 1:
            return values
        gathered = self.trainer.strategy.all_gather(values.to(self._device()))  # (world, N)
        return gathered.reshape(-1).to(values.device, values.dtype)

    def _rank(self) -> tuple[int, int]:
        return getattr(self.trainer, "global_rank", 0), getattr(self.trainer, "world_size", 1)

    def state_dict(self) -> dict[str, Any]:
        """Prompt-stream position and running reward statistics (stored in Lightning checkpoints)."""
        state: dict[str, Any] = {"rollouts_drawn": self.rollouts_drawn}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollouts_drawn = int(state_dict["rollouts_drawn"])
        if self.moments is not None and "reward_moments" in state_dict:
            self.moments.load_state_dict(state_dict["reward_moments"])
