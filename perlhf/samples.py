"""Tables of sampled text (prompts, responses, rewards) for whichever Lightning loggers a run has.

Lightning's ``Logger`` API carries numbers only; each logger has its own way to store text:

- ``TensorBoardLogger``: a markdown table through ``add_text`` (the TEXT tab);
- ``CSVLogger``: rows appended to ``<log_dir>/<key>.csv`` (``/`` in the key becomes ``_``),
  with a ``step`` column, beside its ``metrics.csv``;
- ``WandbLogger``: a ``wandb.Table`` through ``log_text``;
- any other logger with a ``log_text(key, columns, data, step)`` method (as W&B's) gets that
  call; loggers with none are skipped, with one warning per logger type.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

_warned: set[str] = set()


@rank_zero_only
def log_samples(
    loggers: Iterable[Logger], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """Write a table ``rows`` (each one value per column) under ``key`` at ``step`` to every logger."""
    rows = [list(row) for row in rows]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), step)
        elif isinstance(logger, CSVLogger):
            append_csv(Path(logger.log_dir) / f"{key.replace('/', '_')}.csv", columns, rows, step)
        elif callable(getattr(logger, "log_text", None)):
            logger.log_text(key=key, columns=list(columns), data=rows, step=step)
        elif type(logger).__name__ not in _warned:
            _warned.add(type(logger).__name__)
            rank_zero_warn(
                f"{type(logger).__name__} has no way to store text: sample tables ({key}) are not logged"
            )


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; ``|`` escaped and newlines shown as ``⏎`` so each row stays one line."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def append_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
    """Append ``rows`` with a leading ``step`` column to ``path``, writing the header once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["step", *columns])
        writer.writerows([step, *row] for row in rows)


def _cell(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "⏎")
