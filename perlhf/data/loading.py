"""Loading shared by the DataModules: ``datasets`` sources, train/validation splits, tokenizer names.

``load_dataset_dict`` runs ``datasets.load_dataset`` on a hub id, a local file or folder, or a
builder name with ``data_files``; ``train_val_splits`` picks the train and validation splits,
holding out a seeded share of the train split when there is no validation split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from datasets import Dataset, DatasetDict, load_dataset
from lightning.pytorch.utilities import rank_zero_info

from perlhf.data.formats import RowError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""``datasets`` builder per local file suffix."""

Splits = dict[str, tuple[str, Dataset, list[int] | None]]
"""``{"train"|"val": (source split, dataset, original row ids or None for identity)}``."""


def load_dataset_dict(
    path: str,
    data_files: Any = None,
    name: str | None = None,
    data_dir: str | None = None,
    what: str = "dataset",
) -> DatasetDict:
    """``datasets.load_dataset`` on a hub id, a local ``.json(l)``/``.parquet``/``.csv`` file, a local
    folder, or a builder name (``json``…) with ``data_files``. ``what`` names the data in errors
    (``"could not load preference dataset path=..."``)."""
    local = Path(path)
    if local.is_file():
        if data_files is not None:
            raise ValueError(f"path={path!r} is a file; give either a file path or data_files")
        builder = BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"path={path!r}: unsupported file type; use one of {sorted(BUILDERS)}")
        args: dict[str, Any] = {"path": builder, "data_files": str(local)}
    else:
        args = {"path": path, "name": name, "data_dir": data_dir, "data_files": data_files}
    files = local_files(path, data_files)
    for split, file in files:
        if file.stat().st_size < 4096 and not file.read_text(errors="replace").strip():
            raise ValueError(
                f"{what} file {file} ({split}) is empty: it has no rows; fill it or fix the path"
            )
    try:
        return load_dataset(**args)
    except Exception as err:
        shown = "" if data_files is None else f", data_files={data_files!r}"
        cause = json_problem(files) or str(err) or type(err).__name__
        raise ValueError(f"could not load {what} path={path!r}{shown}: {cause}") from err


def local_files(path: str, data_files: Any) -> list[tuple[str, Path]]:
    """``(split, file)`` for the local files a ``load_dataset`` call reads (hub data: none)."""
    if Path(path).is_file():
        return [("train", Path(path))]
    if data_files is None:
        return []
    by_split = data_files if isinstance(data_files, dict) else {"train": data_files}
    pairs = []
    for split, files in by_split.items():
        for file in [files] if isinstance(files, str) else files:
            if Path(file).is_file():
                pairs.append((split, Path(file)))
    return pairs


def json_problem(files: list[tuple[str, Path]]) -> str | None:
    """What is wrong with local JSON-lines files, naming file and line: a line that is not a JSON
    object, or splits whose first rows have different columns. None: nothing found."""
    columns: dict[str, tuple[Path, list[str]]] = {}
    for split, file in files:
        if file.suffix.lower() not in (".json", ".jsonl"):
            continue
        with open(file, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if number == 1 and text.startswith("["):
                    break  # one JSON array, not JSON lines
                if not text:
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    problem = f"not valid JSON ({err.msg} at column {err.colno})"
                    return f"{file} line {number}: {problem}: {text[:80]!r}"
                if not isinstance(row, dict):
                    return f"{file} line {number}: a JSON object per line is expected, got {text[:80]!r}"
                columns.setdefault(split, (file, sorted(row)))
    if len({tuple(cols) for _, cols in columns.values()}) > 1:
        listed = "; ".join(f"{split} ({file}): {cols}" for split, (file, cols) in columns.items())
        return f"the splits have different columns — {listed}; give every split the same columns"
    return None


def in_memory_dataset(prompts: list | dict[str, list], column: str) -> DatasetDict:
    """Prompts given in Python as a ``DatasetDict``: a list (the train split) or a dict of split
    name -> list. Items are prompts (strings or chat message lists), stored under ``column``, or
    whole rows (dicts: a prompt column and any others, e.g. for reward functions)."""
    splits = prompts if isinstance(prompts, dict) else {"train": prompts}
    out = {}
    for split, items in splits.items():
        if not isinstance(items, list) or not items:
            raise ValueError(f"in-memory prompts[{split!r}] must be a non-empty list, got {items!r:.80}")
        rows = all(isinstance(item, dict) for item in items)
        out[split] = Dataset.from_list(items) if rows else Dataset.from_dict({column: items})
    return DatasetDict(out)


def train_val_splits(
    raw: DatasetDict,
    where: str | Callable[[str | None], str],
    train_split: str,
    val_split: str | None,
    val_fraction: float,
    seed: int,
    limits: dict[str, int | None],
) -> Splits:
    """``{"train"|"val": (source split, dataset, original row ids or None for identity)}``.

    Without ``val_split`` in ``raw``, a seeded ``val_fraction`` of the train split is held out.
    ``limits`` caps the rows per key. ``where`` names the dataset in messages: a string (a split
    shows as ``where[split]``) or a function of the split (None: the whole dataset).
    """

    def named(split: str | None) -> str:
        if callable(where):
            return where(split)
        return where if split is None else f"{where}[{split}]"

    if train_split not in raw:
        raise ValueError(f"{named(None)} has no split {train_split!r} (train_split); splits: {list(raw)}")
    train = raw[train_split]
    if val_split is not None and val_split in raw:
        sources = {"train": (train_split, train, None), "val": (val_split, raw[val_split], None)}
    else:
        n_val = max(1, round(len(train) * val_fraction))
        if n_val >= len(train):
            raise ValueError(
                f"{named(train_split)} has {len(train)} rows, too few to hold out "
                f"val_fraction={val_fraction} for validation"
            )
        rows = list(range(len(train)))
        random.Random(seed).shuffle(rows)
        val_ids, train_ids = sorted(rows[:n_val]), sorted(rows[n_val:])
        rank_zero_info(
            f"{named(None)}: no split {val_split!r}; holding out {n_val} rows of {train_split!r} for "
            f"validation (val_fraction={val_fraction})"
        )
        sources = {
            "train": (train_split, train.select(train_ids), train_ids),
            "val": (train_split, train.select(val_ids), val_ids),
        }
    for key, (split, dataset, row_ids) in sources.items():
        limit = limits.get(key)
        if limit is not None and limit < len(dataset):
            sources[key] = (split, dataset.select(range(limit)), row_ids and row_ids[:limit])
    return sources


def tokenizer_name_from(
    datamodule: L.LightningDataModule, explicit: str | None, what: str = "tokenizer"
) -> tuple[str, str]:
    """``(name, config key)``: ``explicit`` if given, else the ``tokenizer_name_or_path`` of the
    LightningModule that ``datamodule``'s Trainer trains; ``what`` names the tokenizer in the error."""
    if explicit:
        return explicit, "data.init_args.tokenizer"
    trainer = datamodule.trainer
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    name = getattr(module, "tokenizer_name_or_path", None)
    if not name:
        raise ValueError(
            f"{type(datamodule).__name__} has no {what}: pass tokenizer=<hub id or path>, or use it "
            "with a Trainer whose LightningModule has a tokenizer_name_or_path (perlhf modules do)"
        )
    return name, getattr(getattr(module, "config", None), "tokenizer_key", "tokenizer")


def check_text_data_args(
    formats: Collection[str],
    canonical: Collection[str],
    format: str,
    overlong: str,
    val_fraction: float,
    max_length: int,
    columns: dict[str, str] | None,
) -> None:
    """The constructor checks shared by the text DataModules (preference and SFT data)."""
    if format != "auto" and format not in formats:
        raise ValueError(f"format must be 'auto' or one of {sorted(formats)}, got {format!r}")
    if overlong not in ("drop", "error", "truncate"):
        raise ValueError(f"overlong must be 'drop', 'error' or 'truncate', got {overlong!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    unknown = sorted(set(columns or {}) - set(canonical))
    if unknown:
        raise ValueError(
            f"columns keys {unknown} are not canonical column names; the keys are "
            f"canonical names ({sorted(canonical)}), the values dataset columns"
        )


def check_counts(**values: int | None) -> None:
    """Batch sizes and sample limits: each at least 1 (None: unset). Raised at construction."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"data.init_args.{key} must be >= 1, got {value}")


def source_name(path: str, data_files: Any, split: str | None) -> str:
    """``path[split]`` for messages; a builder name (``json``…) shows its data files instead."""
    name = path
    if path in BUILDERS.values() and data_files is not None:
        name = str(data_files.get(split, data_files) if isinstance(data_files, dict) else data_files)
    return name if split is None else f"{name}[{split}]"


def check_mapped_columns(where: str, columns: dict[str, str], found: list[str]) -> None:
    """Every dataset column a ``columns`` mapping names must exist."""
    for canonical, column in columns.items():
        if column not in found:
            raise ValueError(
                f"{where}: columns={{{canonical!r}: {column!r}}} names a missing column "
                f"{column!r}; columns found: {found}"
            )


def row_failure(where: str, row_id: int, err: RowError, view: dict[str, str]) -> ValueError:
    """``err`` about one row, as the error a user sees: dataset, split, row, column (and the
    dataset column it was mapped from)."""
    source = view[err.column]
    mapped = "" if source == err.column else f" (dataset column {source!r})"
    return ValueError(f"{where} row {row_id}: {err}{mapped}")
