"""Supervised fine-tuning data: prompt/completion pairs, chat conversations or plain text.

``SFTDataModule`` loads any ``datasets`` source (as ``PreferenceDataModule`` does), detects (or is
told) the format, validates every row and tokenizes it into ``input_ids`` and ``labels`` with
``-100`` on the tokens that are not trained (the prompt, non-assistant turns, padding).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as L
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from perlhf.data.formats import RowError, _response, _string
from perlhf.data.loading import (
    check_counts,
    check_mapped_columns,
    check_text_data_args,
    load_dataset_dict,
    row_failure,
    source_name,
    tokenizer_name_from,
    train_val_splits,
)
from perlhf.data.rollout_utils import encode, right_pad
from perlhf.data.sampler import ResumableDataLoader, train_sampler
from perlhf.models import load_tokenizer

Format = Literal["auto", "prompt_completion", "conversational", "text"]
SFT_FORMATS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "conversational": ("messages",),
    "text": ("text",),
}
"""Required canonical columns per format."""
SFT_CANONICAL: frozenset[str] = frozenset(c for cols in SFT_FORMATS.values() for c in cols)
IGNORE_INDEX = -100
"""Label of tokens that carry no loss (``torch.nn.functional.cross_entropy``'s default)."""


@dataclass
class Parts:
    """One tokenized example before length limits: a head that is cut from the left when too long,
    then a body (the completion) that must fit, with per-token training flags."""

    prompt: list[int]
    completion: list[int]
    trained: list[bool]
    """Whether each ``completion`` token carries loss."""


def detect_sft_format(columns: Collection[str]) -> str | None:
    """The SFT format a dataset with these (canonical) columns is in, or None if none matches."""
    if "messages" in columns:
        return "conversational"
    if {"prompt", "completion"} <= set(columns):
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return None


class SFTDataModule(L.LightningDataModule):
    """Demonstrations for supervised fine-tuning of a causal LM.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, L)`` and right-padded
    per batch to its longest example; ``labels`` is ``-100`` wherever no loss is taken (padding,
    and with ``completion_only_loss`` the prompt or non-assistant turns), else the token id (the
    model shifts labels by one itself).

    Formats:
        ``prompt_completion``: string columns ``prompt`` and ``completion``; the two are tokenized
        separately (prompt with special tokens, completion without) so the boundary is exact, and
        the completion gets the EOS token appended (``add_eos``).
        ``conversational``: column ``messages``, a list of ``{"role", "content"}`` rendered with the
        tokenizer's chat template; with ``completion_only_loss`` only assistant turns (content and
        the template's end-of-turn text) are trained. Turns are located by rendering prefixes of the
        conversation, so the template must render a prefix as a prefix of the whole. ``add_eos``
        appends EOS after a final assistant turn unless the rendering already ends with it.
        ``text``: column ``text``; every token is trained (EOS appended with ``add_eos``).

    Too long: the prompt (of a conversation: everything before the first assistant turn) is cut
    from the left, keeping a leading BOS; a completion longer than ``max_length`` leaves is
    handled by ``overlong``. Texts, and conversations without ``completion_only_loss``, are all
    completion.

    Args:
        path: Hub id, local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, local folder, or builder
            name (``json``, ``parquet``, ``csv``) used with ``data_files``.
        data_files: Files for ``load_dataset``; a dict maps split names to files.
        name: Dataset configuration name.
        data_dir: Sub-folder of the dataset to load.
        train_split: Split to train on.
        val_split: Split to validate on; None or absent: ``val_fraction`` of the train split.
        val_fraction: Share of the train split held out when there is no validation split.
        format: ``prompt_completion``, ``conversational`` or ``text``; ``auto`` detects it from the
            column names (``messages``, then ``prompt`` + ``completion``, then ``text``).
        columns: Canonical column name -> dataset column name, e.g. ``{"completion": "response"}``.
        tokenizer: Tokenizer hub id or path; None: the attached LightningModule's
            ``tokenizer_name_or_path``.
        max_length: Maximum tokens per example.
        overlong: Examples whose completion alone exceeds ``max_length``: ``drop``, ``error`` or
            ``truncate`` (cut the completion on the right).
        completion_only_loss: Train on completions / assistant turns only; False: on every token.
        add_eos: Append the tokenizer's EOS token to completions and texts, so the model learns to
            stop.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; None: ``batch_size``.
        max_train_samples: Use at most this many training rows.
        max_val_samples: Use at most this many validation rows.
        seed: Seed of the validation hold-out and of training shuffling.
        group_by_length: Batch training examples of similar length together (mega-batches of
            50 batches sorted by length, batches shuffled within; order still from ``seed`` and
            the epoch, so resuming is exact): far less padding when lengths vary.
    """

    def __init__(
        self,
        path: str,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        name: str | None = None,
        data_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_fraction: float = 0.05,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        overlong: Literal["drop", "error", "truncate"] = "drop",
        completion_only_loss: bool = True,
        add_eos: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        check_text_data_args(SFT_FORMATS, SFT_CANONICAL, format, overlong, val_fraction, max_length, columns)
        check_counts(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_train_samples=max_train_samples,
            max_val_samples=max_val_samples,
        )
        self.save_hyperparameters()
        self.path, self.data_files, self.name, self.data_dir = path, data_files, name, data_dir
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.format: str = format
        self.columns = dict(columns or {})
        self.tokenizer_name = tokenizer
        self.max_length, self.overlong = max_length, overlong
        self.completion_only_loss, self.add_eos = completion_only_loss, add_eos
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_samples = {"train": max_train_samples, "val": max_val_samples}
        self.seed = seed
        self.group_by_length = group_by_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Dataset] = {}
        self.num_dropped: dict[str, int] = {}
        """Rows per split dropped for exceeding ``max_length`` (``overlong="drop"``)."""
        self.num_truncated: dict[str, int] = {}
        """Rows per split whose prompt or completion was cut to fit ``max_length``."""

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        wanted = ["train", "val"] if stage in (None, "fit") else ["val"]
        if all(key in self.datasets for key in wanted):
            return
        raw = self._load()
        if self.tokenizer is None:
            name, key = tokenizer_name_from(self, self.tokenizer_name)
            self.tokenizer = load_tokenizer(name, what=key)
        if self.add_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"add_eos=True but tokenizer {self.tokenizer.name_or_path!r} has no eos token; "
                "set add_eos=False or use a tokenizer with one"
            )
        sources = train_val_splits(
            raw, self._where, self.train_split, self.val_split, self.val_fraction, self.seed, self.max_samples
        )
        for key in wanted:
            if key not in self.datasets:
                split, dataset, row_ids = sources[key]
                self.datasets[key] = self._encode_split(key, split, dataset, row_ids)

    def train_dataloader(self) -> DataLoader:
        # Order depends on (seed, epoch) only and the loader's position is checkpointed, so a run
        # resumed at any step sees the batches the uninterrupted run would have seen.
        sampler = (
            train_sampler(self.datasets["train"], self.seed, self.batch_size, self.group_by_length)
            if "train" in self.datasets
            else None
        )
        return self._loader("train", self.batch_size, sampler=sampler, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(
        self, key: str, batch_size: int, loader: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if key not in self.datasets:
            raise RuntimeError(f"SFTDataModule has no {key} data yet; call setup() first")
        collate = SFTCollator(self.tokenizer.pad_token_id)
        # A private generator: starting an epoch must not draw from the global one (dropout's), or a
        # resumed run's random stream would drift from the uninterrupted run's.
        return loader(
            self.datasets[key],
            batch_size=batch_size,
            collate_fn=collate,
            generator=torch.Generator(),
            **kwargs,
        )

    def _load(self) -> DatasetDict:
        return load_dataset_dict(self.path, self.data_files, self.name, self.data_dir, "SFT dataset")

    def _where(self, split: str | None) -> str:
        return source_name(self.path, self.data_files, split)

    def _resolve_columns(self, split: str, dataset: Dataset) -> dict[str, str]:
        """Canonical name -> dataset column for the columns the format reads; resolves ``auto``."""
        where = self._where(split)
        found = dataset.column_names
        check_mapped_columns(where, self.columns, found)
        view = {**{c: c for c in found if c in SFT_CANONICAL}, **self.columns}
        if self.format == "auto":
            detected = detect_sft_format(set(view))
            if detected is None:
                needs = "; ".join(f"{fmt}: {list(cols)}" for fmt, cols in SFT_FORMATS.items())
                raise ValueError(
                    f"{where}: cannot tell the SFT format from columns {found} (formats need "
                    f"{needs}); map columns with columns={{'completion': ..., ...}} or set format="
                )
            self.format = detected
        for column in SFT_FORMATS[self.format]:
            if column not in view:
                raise ValueError(
                    f"{where}: format {self.format!r} needs column {column!r}, which is "
                    f"missing; columns found: {found}; map one with "
                    f"columns={{{column!r}: '<column>'}}"
                )
        if self.format == "conversational" and not self.tokenizer.chat_template:
            raise ValueError(
                f"{where}: conversational data needs a tokenizer with a chat template, and "
                f"{self.tokenizer.name_or_path!r} has none; set tokenizer= to a chat model's, or "
                "give prompt/completion strings (format='prompt_completion')"
            )
        return {c: view[c] for c in SFT_FORMATS[self.format]}

    def _encode_split(self, key: str, split: str, dataset: Dataset, row_ids: list[int] | None) -> Dataset:
        view = self._resolve_columns(split, dataset)
        outputs = ("input_ids", "labels", "cut")

        def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {name: [] for name in outputs}
            for i, index in enumerate(indices):
                row = {c: batch[column][i] for c, column in view.items()}
                try:
                    encoded = self._encode(row)
                except RowError as err:
                    row_id = index if row_ids is None else row_ids[index]
                    raise row_failure(self._where(split), row_id, err, view) from None
                if encoded is not None:
                    for name in outputs:
                        out[name].append(encoded[name])
            return out

        encoded = dataset.map(
            encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
            desc=f"Tokenizing {key}",
        )
        self.num_dropped[key] = len(dataset) - len(encoded)
        self.num_truncated[key] = sum(encoded["cut"]) if len(encoded) else 0
        encoded = encoded.remove_columns("cut")
        rank_zero_info(
            f"{self._where(split)} ({key}, format {self.format}): {len(encoded)} examples, "
            f"{self.num_dropped[key]} dropped and {self.num_truncated[key]} cut for exceeding "
            f"max_length={self.max_length} (overlong={self.overlong!r})"
        )
        if len(encoded) == 0:
            raise ValueError(
                f"{self._where(split)}: no {key} examples left after dropping overlong rows; "
                "raise max_length or set overlong='truncate'"
            )
        return encoded

    def _encode(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """``input_ids`` and ``labels`` of one row (canonical columns) within ``max_length``, and
        whether it was ``cut``; None if it is overlong and ``overlong="drop"``."""
        if self.format == "prompt_completion":
            tokens, column = self._prompt_completion(row), "completion"
        elif self.format == "conversational":
            tokens, column = self._conversation(row), "messages"
        else:
            tokens, column = self._text(row), "text"
        prompt, completion, trained = tokens.prompt, tokens.completion, tokens.trained
        bos = self.tokenizer.bos_token_id
        keep = int(bool(prompt) and bos is not None and prompt[0] == bos)
        room = self.max_length - min(len(prompt), keep + 1)  # keep BOS and one prompt token at least
        cut = len(prompt) + len(completion) > self.max_length
        if len(completion) > room:
            if self.overlong == "drop":
                return None
            if self.overlong == "error":
                what = " from its first assistant turn on" if column == "messages" else ""
                raise RowError(
                    column,
                    f"is {len(completion)} tokens{what}, more than max_length={self.max_length} leaves "
                    "after the prompt; raise max_length or set overlong='drop' (or 'truncate')",
                )
            completion, trained = completion[:room], trained[:room]
        budget = self.max_length - len(completion)
        if len(prompt) > budget:
            prompt = prompt[:keep] + prompt[len(prompt) - budget + keep :]
        prompt_labels = [IGNORE_INDEX] * len(prompt) if self.completion_only_loss else list(prompt)
        body = [t if on else IGNORE_INDEX for t, on in zip(completion, trained, strict=True)]
        labels = prompt_labels + body
        return {"input_ids": prompt + completion, "labels": labels, "cut": cut}

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if self.add_eos and (not ids or ids[-1] != eos):
            return [*ids, eos]
        return ids

    def _prompt_completion(self, row: dict[str, Any]) -> Parts:
        prompt_text = _string(row["prompt"], "prompt")
        completion_text = _response(row["completion"], "completion")
        prompt = encode(self.tokenizer, prompt_text)
        completion = self._with_eos(self.tokenizer(completion_text, add_special_tokens=False)["input_ids"])
        return Parts(prompt, completion, [True] * len(completion))

    def _text(self, row: dict[str, Any]) -> Parts:
        ids = self._with_eos(encode(self.tokenizer, _response(row["text"], "text")))
        return Parts([], ids, [True] * len(ids))

    def _conversation(self, row: dict[str, Any]) -> Parts:
        """Tokenize the rendered conversation piece by piece: the first piece with special tokens,
        the rest without, so assistant-turn boundaries are exact token boundaries."""
        messages = _chat_messages(row["messages"])
        if not self.completion_only_loss:
            pieces = [(_render(self.tokenizer, messages), True)]
        else:
            pieces = _render_pieces(self.tokenizer, messages)
        if not any(trained for _, trained in pieces):
            roles = sorted({m["role"] for m in messages})
            raise RowError(
                "messages",
                f"has no non-empty message with role 'assistant' (roles: {roles}), so nothing "
                "would be trained; fix or remove the row, or set completion_only_loss=False",
            )
        eos = self.tokenizer.eos_token
        rendered = "".join(text for text, _ in pieces)
        last_trained = pieces[-1][1]
        ends_with_eos = bool(eos) and rendered.rstrip().endswith(eos)
        prompt: list[int] = []
        completion: list[int] = []
        trained: list[bool] = []
        for i, (text, on) in enumerate(pieces):
            if i == 0:
                ids = encode(self.tokenizer, text)
            else:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not on and not completion:
                prompt += ids
            else:
                completion += ids
                trained += [on] * len(ids)
        if self.add_eos and messages[-1]["role"] == "assistant" and not ends_with_eos:
            completion.append(self.tokenizer.eos_token_id)
            trained.append(last_trained)
        return Parts(prompt, completion, trained)


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    """Validated messages, without the ``None`` fields Arrow fills in for keys other rows have."""
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise RowError(
            "messages",
            "is not a non-empty list of {'role': str, 'content': str} messages; fix or remove the "
            "row, or map another column with columns={'messages': ...}",
        )
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # template errors (jinja2 exceptions, raise_exception) vary
        raise RowError("messages", f"cannot be rendered by the chat template: {err}") from None


def _render_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]
) -> list[tuple[str, bool]]:
    """The chat-template rendering of ``messages`` as ``(text, is_assistant_turn)`` pieces.

    An assistant turn spans from the end of the rendering of the conversation before it with a
    generation prompt to the end of the rendering up to and including it: its content plus the
    template's end-of-turn text. Empty assistant messages are not trained.
    """
    full = _render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        start, end = len(before), len(upto)
        consistent = done <= start <= end and full.startswith(before) and full.startswith(upto)
        if not consistent:
            raise RowError(
                "messages",
                "cannot be split into turns: the chat template does not render the conversation "
                f"before assistant message {i} as a prefix of the whole (some templates rewrite "
                "earlier turns); set completion_only_loss=False to train on every token",
            )
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


class SFTCollator:
    """Right-pads encoded examples into ``input_ids``/``attention_mask``/``labels`` of shape
    ``(B, L)``; ``labels`` is padded with ``-100``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = right_pad([e["input_ids"] for e in examples], self.pad_token_id)
        labels, _ = right_pad([e["labels"] for e in examples], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
