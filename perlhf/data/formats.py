"""Preference-data formats: detection from column names and pure row → example functions.

Every format reduces a row to a text example. Pairwise formats give
``{"prompt", "chosen", "rejected"}`` (plus ``"margin"`` when the row has one); the classifier
format gives ``{"prompt", "response", "label"}`` with ``label`` 0. or 1. Rows hold canonical
column names (after ``PreferenceDataModule``'s ``columns`` mapping). Problems raise ``RowError``
naming the column and the fix; the caller adds the dataset, split and row index.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from transformers import PreTrainedTokenizerBase

FORMATS: dict[str, tuple[str, ...]] = {
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "scored": ("history", "human_ref_A", "human_ref_B", "labels"),
    "classifier": ("prompt", "response", "label"),
}
"""Required canonical columns per format."""
OPTIONAL: dict[str, tuple[str, ...]] = {
    "explicit": ("margin",),
    "implicit": ("margin",),
    "conversational": ("prompt", "margin"),
    "scored": ("margin",),
    "classifier": (),
}
"""Columns a format reads when present."""
CANONICAL: frozenset[str] = frozenset(c for cols in (*FORMATS.values(), *OPTIONAL.values()) for c in cols)
CLASSIFIER_LABELS = "0/1, True/False or 'good'/'bad'"
SCORED_SEPARATOR = "\n\n"
"""Appended to an SHP ``history`` so the response does not run on from the post's last word."""

Row = dict[str, Any]


class RowError(ValueError):
    """A problem with one row in ``column`` (canonical name); the message starts with the column."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(f"column {column!r} {problem}")
        self.column = column


def detect_format(columns: Collection[str], chosen_is_list: bool) -> str | None:
    """The format a dataset with these (canonical) columns is in, or None if none matches."""
    if {"label", "response"} <= set(columns):
        return "classifier"
    if "human_ref_A" in columns:
        return "scored"
    if "chosen" in columns and chosen_is_list:
        return "conversational"
    if "prompt" in columns:
        return "explicit"
    if {"chosen", "rejected"} <= set(columns):
        return "implicit"
    return None


def to_example(fmt: str, row: Row, tokenizer: PreTrainedTokenizerBase, response_marker: str) -> Row:
    """Dispatch ``row`` to its format's function; pairwise examples pick up a ``margin`` column."""
    if fmt == "classifier":
        return classifier_example(row)
    if fmt == "explicit":
        example = explicit_example(row)
    elif fmt == "implicit":
        example = implicit_example(row, response_marker)
    elif fmt == "conversational":
        example = conversational_example(row, tokenizer)
    else:
        example = scored_example(row)
    if "margin" in row:
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
            raise RowError("margin", f"has value {margin!r}, not a number; fix or remove the row")
        example["margin"] = float(margin)
    return example


def explicit_example(row: Row) -> Row:
    chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    _check_distinct(chosen, rejected)
    return {"prompt": _string(row["prompt"], "prompt"), "chosen": chosen, "rejected": rejected}


def implicit_example(row: Row, response_marker: str) -> Row:
    """Split two full transcripts at the last ``response_marker`` of their common prefix."""
    chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    _check_distinct(chosen, rejected)
    cut = os.path.commonprefix([chosen, rejected]).rfind(response_marker)
    if cut < 0:
        raise RowError(
            "chosen",
            f"and column 'rejected' share no {response_marker!r} in their common "
            "prefix, so the prompt cannot be split off; set response_marker to the text that opens "
            "the reply, or use format='explicit' with a prompt column",
        )
    cut += len(response_marker)
    return {
        "prompt": chosen[:cut],
        "chosen": _response(chosen[cut:], "chosen", " after the prompt"),
        "rejected": _response(rejected[cut:], "rejected", " after the prompt"),
    }


def conversational_example(row: Row, tokenizer: PreTrainedTokenizerBase) -> Row:
    """Render message lists with the tokenizer's chat template; the reply is the final message."""
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt = _messages(row["prompt"], "prompt", allow_empty=True) if "prompt" in row else []
    if chosen[:-1] != rejected[:-1]:
        raise RowError(
            "chosen",
            "and column 'rejected' differ before their final message; only the "
            "final assistant message may differ (put shared turns in both or in a prompt column)",
        )
    for column, message in (("chosen", chosen[-1]), ("rejected", rejected[-1])):
        if message.get("role") != "assistant":
            raise RowError(
                column,
                f"ends with a {message.get('role')!r} message, not 'assistant'; "
                "the final message must be the assistant's reply",
            )
        _response(message.get("content"), column, " (final message)")
    _check_distinct(chosen[-1]["content"], rejected[-1]["content"])
    context = prompt + chosen[:-1]
    prompt_text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    return {
        "prompt": prompt_text,
        "chosen": _render_reply(tokenizer, context, chosen[-1], prompt_text),
        "rejected": _render_reply(tokenizer, context, rejected[-1], prompt_text),
    }


def scored_example(row: Row) -> Row:
    """Stanford SHP: ``labels`` 1 means ``human_ref_A`` is preferred, 0 means ``human_ref_B``."""
    a, b = _response(row["human_ref_A"], "human_ref_A"), _response(row["human_ref_B"], "human_ref_B")
    _check_distinct(a, b, ("human_ref_A", "human_ref_B"))
    a_wins = _binary(row["labels"], "labels", {}, "0/1 (1: human_ref_A preferred)")
    chosen, rejected = (a, b) if a_wins else (b, a)
    prompt = _string(row["history"], "history") + SCORED_SEPARATOR
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def classifier_example(row: Row) -> Row:
    return {
        "prompt": _string(row["prompt"], "prompt"),
        "response": _response(row["response"], "response"),
        "label": _binary(row["label"], "label", {"good": 1.0, "bad": 0.0}, CLASSIFIER_LABELS),
    }


def _string(value: Any, column: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else f"a {type(value).__name__}"
        raise RowError(
            column,
            f"is {kind}, not a string; fix or remove the row, or map another "
            f"column with columns={{{column!r}: ...}}",
        )
    return value


def _response(value: Any, column: str, where: str = "") -> str:
    text = _string(value, column)
    if not text.strip():
        raise RowError(
            column, f"is empty{where}; remove the row or map another column with columns={{{column!r}: ...}}"
        )
    return text


def _check_distinct(chosen: str, rejected: str, columns: tuple[str, str] = ("chosen", "rejected")) -> None:
    if chosen == rejected:
        raise RowError(
            columns[0],
            f"and column {columns[1]!r} are identical, which carries no preference; remove the row",
        )


def _binary(value: Any, column: str, words: dict[str, float], allowed: str) -> float:
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return float(value)
    raise RowError(column, f"has value {value!r}; allowed values are {allowed}; fix or remove the row")


def _messages(value: Any, column: str, allow_empty: bool = False) -> list[dict[str, Any]]:
    ok = isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    if not ok or (not value and not allow_empty):
        raise RowError(
            column,
            "is not a non-empty list of {{'role', 'content'}} messages; fix the row "
            "or use format='explicit' for plain strings",
        )
    return value


def _render_reply(
    tokenizer: PreTrainedTokenizerBase, context: list[dict[str, Any]], reply: dict[str, Any], prompt_text: str
) -> str:
    """The template's rendering of ``reply`` after ``context``: the full conversation minus the
    prompt; the bare content + eos when the template renders the prompt differently in context."""
    full = tokenizer.apply_chat_template([*context, reply], tokenize=False)
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    return reply["content"] + (tokenizer.eos_token or "")
