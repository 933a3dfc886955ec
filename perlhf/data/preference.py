"""Preference data for reward models: any ``datasets`` source in five common formats.

``PreferenceDataModule`` loads a hub dataset, a local file or folder with ``datasets.load_dataset``,
detects (or is told) the format, validates every row, tokenizes prompt and responses separately
and truncates the prompt from the left so responses stay whole. See ``perlhf.data.formats``.

With an image column, prompts carry images (``explicit`` and ``classifier`` formats): each prompt
is a user turn of images + text rendered with the VLM's processor and chat template, and batches
carry the images' pixel inputs under ``vision`` (see ``perlhf.data.images``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import lightning.pytorch as L
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from perlhf.data.formats import CANONICAL, FORMATS, OPTIONAL, RowError, detect_format, to_example
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
    check_counts,
    check_mapped_columns,
    check_text_data_args,
    load_dataset_dict,
    row_failure,
    source_name,
    tokenizer_name_from,
    train_val_splits,
)
from perlhf.data.rollout_utils import right_pad
from perlhf.data.sampler import ResumableDataLoader, train_sampler
from perlhf.models import load_tokenizer

Format = Literal["auto", "explicit", "implicit", "conversational", "scored", "tldr", "classifier"]


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or good/bad labelled responses) for reward-model training.

    Pairwise batches hold ``input_ids``/``attention_mask`` of shape ``(2B, L)``, rows ``[:B]``
    chosen and ``[B:]`` rejected (one forward pass), ``prompt_lengths`` ``(B,)`` (each pair's
    prompt tokens), plus ``margin`` ``(B,)`` when the data has one; classifier batches hold
    ``(B, L)`` sequences and float ``labels`` ``(B,)``. Image data adds ``vision``: the pixel
    inputs of every row's images, in row order (chosen rows' images, then the same images again
    for the rejected rows).

    Args:
        path: Hub id (``Anthropic/hh-rlhf``), local ``.json``/``.jsonl``/``.parquet``/``.csv`` file,
            local folder, or builder name (``json``, ``parquet``, ``csv``) used with ``data_files``.
        data_files: Files for ``load_dataset``; a dict maps split names to files.
        name: Dataset configuration name.
        data_dir: Sub-folder of the dataset to load (e.g. ``harmless-base``).
        train_split: Split to train on.
        val_split: Split to validate on; None or absent: ``val_fraction`` of the train split.
        val_fraction: Share of the train split held out when there is no validation split.
        format: ``explicit`` (prompt/chosen/rejected), ``implicit`` (HH-RLHF transcripts),
            ``conversational`` (message lists), ``scored`` (Stanford SHP), ``classifier``
            (prompt/response/label); ``auto`` detects it from the column names.
        columns: Canonical column name -> dataset column name, e.g. ``{"margin": "gold_margin"}``.
        tokenizer: Tokenizer hub id or path; None: the attached LightningModule's
            ``tokenizer_name_or_path``.
        max_length: Maximum tokens per sequence (prompt + response).
        overlong: Rows whose response alone exceeds ``max_length``: ``drop``, ``error`` or
            ``truncate`` (cut the response on the right).
        response_marker: Text that opens the reply in ``implicit`` transcripts.
        batch_size: Training batch size (pairs or labelled responses).
        eval_batch_size: Validation/test/predict batch size; None: ``batch_size``.
        max_train_samples: Use at most this many training rows.
        max_val_samples: Use at most this many validation rows.
        seed: Seed of the validation hold-out and of training shuffling.
        group_by_length: Batch training examples of similar length together (mega-batches of
            50 batches sorted by length, batches shuffled within; order still from ``seed`` and
            the epoch, so resuming is exact): far less padding when lengths vary.
        group_by_prompt: Keep each prompt's pairs together in the training order (prompts and
            pairs shuffled from ``seed`` and the epoch): with ``RewardModule(share_prefix=True)`` a
            batch then computes each prompt and each distinct answer once, so data with several
            pairs per prompt (K answers make K(K-1)/2 pairs, as in InstructGPT) trains several
            times faster per pair, and an answer's comparisons land in one step.
        image_column: Column of each prompt's images (a file path, image bytes or a PIL image, or a
            list of them); None: ``images`` or ``image`` when the data has one. Image data is
            encoded with the processor (``AutoProcessor``) of the tokenizer's model, a VLM.
        image_root: Folder that image paths in the data are relative to and confined to; None: the
            folder of the local data files (the working directory for hub data).
        allow_images_outside_root: Read image paths outside ``image_root`` too (trusted data only).
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
        response_marker: str = "\n\nAssistant:",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        group_by_prompt: bool = False,
        image_column: str | None = None,
        image_root: str | None = None,
        allow_images_outside_root: bool = False,
    ) -> None:
        super().__init__()
        check_text_data_args(FORMATS, CANONICAL, format, overlong, val_fraction, max_length, columns)
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
        self.max_length, self.overlong, self.response_marker = max_length, overlong, response_marker
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_samples = {"train": max_train_samples, "val": max_val_samples}
        self.seed = seed
        if group_by_length and group_by_prompt:
            raise ValueError(
                "group_by_length and group_by_prompt order the training pairs two different ways; "
                "set one of them to false"
            )
        self.group_by_length, self.group_by_prompt = group_by_length, group_by_prompt
        self.image_column = image_column
        self.image_root, self.allow_images_outside_root = image_root, allow_images_outside_root
        self.processor = None  # a VLM's processor, loaded when the data has images
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Dataset] = {}
        self.num_dropped: dict[str, int] = {}
        """Rows per split dropped: overlong (``overlong="drop"``), or cut to ``chosen == rejected``."""
        self.num_truncated: dict[str, int] = {}
        """Rows per split whose prompt or responses were cut to fit ``max_length``."""
        self._tally: Counter[str] = Counter()

    @property
    def is_pairwise(self) -> bool:
        if self.format == "auto":
            raise RuntimeError("the format is detected in setup(); call setup() first")
        return self.format != "classifier"

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
        sources = self._splits(raw)
        for key in wanted:
            if key not in self.datasets:
                split, dataset, row_ids = sources[key]
                self.datasets[key] = self._encode_split(key, split, dataset, row_ids)

    def train_dataloader(self) -> DataLoader:
        # Order depends on (seed, epoch) only and the loader's position is checkpointed, so a run
        # resumed at any step sees the batches the uninterrupted run would have seen.
        if self.group_by_prompt and "train" in self.datasets and not self.is_pairwise:
            raise ValueError(
                "group_by_prompt groups preference pairs by prompt; classifier data has none: set "
                "group_by_prompt: false"
            )
        sampler = (
            train_sampler(
                self.datasets["train"], self.seed, self.batch_size, self.group_by_length, self.group_by_prompt
            )
            if "train" in self.datasets
            else None
        )
        return self._loader("train", self.batch_size, sampler=sampler, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(
        self, key: str, batch_size: int, loader: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if key not in self.datasets:
            raise RuntimeError(f"PreferenceDataModule has no {key} data yet; call setup() first")
        collate = PadCollator(self.tokenizer.pad_token_id, self.processor)
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
        return load_dataset_dict(self.path, self.data_files, self.name, self.data_dir, "preference dataset")

    def _where(self, split: str | None) -> str:
        return source_name(self.path, self.data_files, split)

    def _splits(self, raw: DatasetDict) -> Splits:
        """``{"train"|"val": (source split, dataset, original row ids or None for identity)}``."""
        return train_val_splits(
            raw, self._where, self.train_split, self.val_split, self.val_fraction, self.seed, self.max_samples
        )

    def _resolve_columns(self, split: str, dataset: Dataset) -> dict[str, str]:
        """Canonical name -> dataset column for the columns the format reads; resolves ``auto``."""
        where = self._where(split)
        found = dataset.column_names
        check_mapped_columns(where, self.columns, found)
        view = {**{c: c for c in found if c in CANONICAL}, **self.columns}
        if self.format == "auto":
            first = dataset[0] if len(dataset) else {}
            chosen_is_list = isinstance(first.get(view.get("chosen")), list)
            detected = detect_format(view, chosen_is_list)
            if detected is None:
                needs = "; ".join(f"{fmt}: {list(cols)}" for fmt, cols in FORMATS.items())
                raise ValueError(
                    f"{where}: cannot tell the format from columns {found} (formats need "
                    f"{needs}); map columns with columns={{'chosen': ..., ...}} or set format="
                )
            self.format = detected
        for column in FORMATS[self.format]:
            if column not in view:
                raise ValueError(
                    f"{where}: format {self.format!r} needs column {column!r}, which is "
                    f"missing; columns found: {found}; map one with "
                    f"columns={{{column!r}: '<column>'}}"
                )
        if self.format == "conversational" and not self.tokenizer.chat_template:
            raise ValueError(
                f"{where}: conversational data needs a tokenizer with a chat template, and "
                f"{self.tokenizer.name_or_path!r} has none; set tokenizer= to a chat model's"
            )
        wanted = FORMATS[self.format] + OPTIONAL[self.format]
        return {c: view[c] for c in wanted if c in view}

    def _encode_split(self, key: str, split: str, dataset: Dataset, row_ids: list[int] | None) -> Dataset:
        view = self._resolve_columns(split, dataset)
        image_column = self._image_column(split, dataset)
        self._tally = Counter()
        if self.is_pairwise:
            outputs = ["chosen_input_ids", "rejected_input_ids", "prompt_length"]
            outputs += ["margin"] if "margin" in view else []
        else:
            outputs = ["input_ids", "labels"]
        root = data_image_root(self.image_root, self.path, self.data_files)
        if image_column is not None:
            outputs.append("images")
            dataset = undecoded(dataset, image_column)

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {name: [] for name in outputs}
            for i, index in enumerate(indices):
                row = {c: batch[column][i] for c, column in view.items()}
                row_id = index if row_ids is None else row_ids[index]
                images = None
                if image_column is not None:
                    where = f"{self._where(split)} row {row_id}, column {image_column!r}"
                    images = row_images(batch[image_column][i], where, root, self.allow_images_outside_root)
                try:
                    example = to_example(self.format, row, self.tokenizer, self.response_marker)
                    encoded = self._encode(example, images)
                except RowError as err:
                    raise row_failure(self._where(split), row_id, err, view) from None
                if encoded is not None:
                    for name in outputs:
                        out[name].append(encoded[name])
            return out

        encoded = dataset.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
            desc=f"Tokenizing {key}",
        )
        self.num_dropped[key] = len(dataset) - len(encoded)
        self.num_truncated[key] = self._tally["truncated"]
        rank_zero_info(
            f"{self._where(split)} ({key}, format {self.format}): {len(encoded)} examples; "
            f"{self._tally['overlong']} dropped for exceeding max_length={self.max_length}, "
            f"{self._tally['identical']} dropped because truncation left chosen == rejected, "
            f"{self.num_truncated[key]} truncated"
        )
        if len(encoded) == 0:
            raise ValueError(
                f"{self._where(split)}: no {key} examples left after dropping overlong rows; "
                "raise max_length or set overlong='truncate'"
            )
        return encoded

    def _image_column(self, split: str, dataset: Dataset) -> str | None:
        """The image column of ``split`` (None: text data); loads the processor when there is one."""
        column = find_image_column(dataset.column_names, self.image_column, self._where(split))
        if column is None:
            return None
        if self.format not in ("explicit", "classifier"):
            raise ValueError(
                f"{self._where(split)}: image data needs format 'explicit' (prompt/chosen/rejected) or "
                f"'classifier' (prompt/response/label), with the images in column {column!r}; got "
                f"format {self.format!r}"
            )
        if self.processor is None:
            self.processor = load_processor(self.tokenizer.name_or_path)
            self.tokenizer = self.processor.tokenizer
        return column

    def _encode(self, example: dict[str, Any], images: list | None = None) -> dict[str, Any] | None:
        """Token ids of one example (and its ``images`` for image data); None if it is overlong
        and ``overlong="drop"``."""
        tok = self.tokenizer
        names = ["chosen", "rejected"] if self.is_pairwise else ["response"]
        responses = {name: tok(example[name], add_special_tokens=False)["input_ids"] for name in names}
        if images is not None:
            # Image prompts are never cut: their image tokens must match the pixel inputs.
            text = render_prompt(self.processor, example["prompt"], len(images))
            prompt = encode_with_images(self.processor, text, images)
            keep = len(prompt)
            if keep >= self.max_length:
                if self.overlong == "drop":
                    self._tally["overlong"] += 1
                    return None
                raise RowError(
                    "prompt",
                    f"with its image tokens is {keep} tokens, no fewer than max_length={self.max_length} "
                    "(image prompts cannot be truncated); raise max_length or set overlong='drop'",
                )
        else:
            prompt_text = example["prompt"]
            # A prompt rendered by a chat template may start with the BOS text; don't add a second one.
            if tok.bos_token and prompt_text.startswith(tok.bos_token) and self._adds_bos():
                prompt_text = prompt_text[len(tok.bos_token) :]
            prompt = tok(prompt_text, add_special_tokens=True)["input_ids"]
            keep = int(bool(prompt) and tok.bos_token_id is not None and prompt[0] == tok.bos_token_id)
        room = self.max_length - min(len(prompt), keep + 1)  # keep BOS and one prompt token at least
        longest = max(names, key=lambda name: len(responses[name]))
        cut = False
        if len(responses[longest]) > room:
            if self.overlong == "drop":
                self._tally["overlong"] += 1
                return None
            if self.overlong == "error":
                raise RowError(
                    longest,
                    f"is {len(responses[longest])} tokens, more than max_length="
                    f"{self.max_length} leaves after the prompt; raise max_length or set "
                    "overlong='drop' (or 'truncate')",
                )
            responses = {name: ids[:room] for name, ids in responses.items()}
            if self.is_pairwise and responses["chosen"] == responses["rejected"]:
                # Cutting a shared long prefix leaves nothing to prefer: a pair with no signal.
                self._tally["identical"] += 1
                return None
            cut = True
        budget = self.max_length - max(len(ids) for ids in responses.values())
        if len(prompt) > budget:
            prompt = prompt[:keep] + prompt[len(prompt) - budget + keep :]
            cut = True
        self._tally["truncated"] += cut
        if not self.is_pairwise:
            encoded = {"input_ids": prompt + responses["response"], "labels": example["label"]}
        else:
            encoded = {f"{name}_input_ids": prompt + ids for name, ids in responses.items()}
            encoded["prompt_length"] = len(prompt)
            if "margin" in example:
                encoded["margin"] = example["margin"]
        if images is not None:
            encoded["images"] = images
        return encoded

    def _adds_bos(self) -> bool:
        tok = self.tokenizer
        return (
            tok("a", add_special_tokens=True)["input_ids"][:1]
            == [tok.bos_token_id]
            != tok("a", add_special_tokens=False)["input_ids"][:1]
        )


class PadCollator:
    """Right-pads a list of encoded examples into a batch (chosen rows first, then rejected); with
    a VLM ``processor``, adds the examples' image inputs under ``vision`` in the same row order."""

    def __init__(self, pad_token_id: int, processor: Any = None) -> None:
        self.pad_token_id = pad_token_id
        self.processor = processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in examples[0]:
            batch = self._pad([e["input_ids"] for e in examples])
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.float32)
        else:
            sequences = [e["chosen_input_ids"] for e in examples] + [
                e["rejected_input_ids"] for e in examples
            ]
            batch = self._pad(sequences)
            if "prompt_length" in examples[0]:
                batch["prompt_lengths"] = torch.tensor(
                    [e["prompt_length"] for e in examples], dtype=torch.long
                )
            if "margin" in examples[0]:
                batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
        if "images" in examples[0]:
            if self.processor is None:
                raise ValueError("examples carry images but PadCollator has no processor to encode them")
            parts = [image_inputs(self.processor, e["images"]) if e["images"] else None for e in examples]
            rows = parts if "labels" in examples[0] else parts + parts  # the rejected half repeats them
            batch["vision"] = combine_vision(rows)
        return batch

    def _pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = right_pad(sequences, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
