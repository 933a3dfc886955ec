"""Preference-data formats: detection from column names and pure row → example functions.

Every format reduces a row to a text example. Pairwise formats give
``{"prompt", "chosen", "rejected"}`` (plus ``"margin"`` when the row has one); the classifier
format gives ``{"prompt", "response", "label"}`` with ``label`` 0. or 1. Rows hold canonical
column names (after ``PreferenceDataModule``'s ``columns`` mapping). Problems raise ``RowError``
naming the column and the fix; the caller adds the dataset, split and row index.

``prompt_of`` and ``prompt_messages`` take only the prompt of a pairwise row, for RL: the same
text the reward model was trained on, checking only the columns the prompt needs.
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
    "tldr": ("info", "summaries", "choice"),
    "classifier": ("prompt", "response", "label"),
}
"""Required canonical columns per format."""
OPTIONAL: dict[str, tuple[str, ...]] = {
    "explicit": ("margin",),
    "implicit": ("margin",),
    "conversational": ("prompt", "margin"),
    "scored": ("margin",),
    "tldr": ("margin",),
    "classifier": (),
}
"""Columns a format reads when present."""
CANONICAL: frozenset[str] = frozenset(c for cols in (*FORMATS.values(), *OPTIONAL.values()) for c in cols)
CLASSIFIER_LABELS = "0/1, True/False or 'good'/'bad'"
SCORED_SEPARATOR = "\n\n"
"""Appended to an SHP ``history`` so the response does not run on from the post's last word."""
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
"""Prompt of a Reddit post in ``openai/summarize_from_feedback`` (the query format of OpenAI's
summarize-from-feedback code); summaries follow with a leading space."""
ARTICLE_TEMPLATE = "Article:\n{article}\n\nTL;DR:"
"""Prompt of a news article (CNN/Daily Mail rows of that dataset, which have no ``post``)."""
PAIRWISE: tuple[str, ...] = ("explicit", "implicit", "conversational", "scored", "tldr")
"""Formats whose rows hold a prompt and two ranked responses."""

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
    if {"info", "summaries", "choice"} <= set(columns):
        return "tldr"
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
    elif fmt == "tldr":
        example = tldr_example(row)
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
    cut = _implicit_cut(chosen, rejected, response_marker)
    return {
        "prompt": chosen[:cut],
        "chosen": _response(chosen[cut:], "chosen", " after the prompt"),
        "rejected": _response(rejected[cut:], "rejected", " after the prompt"),
    }


def conversational_example(row: Row, tokenizer: PreTrainedTokenizerBase) -> Row:
    """Render message lists with the tokenizer's chat template; the reply is the final message.

    An optional ``prompt`` is a list of messages put before the shared turns, or a string (as in
    UltraFeedback, where it repeats the user turn): ignored when the shared turns already hold a
    user message, otherwise the user message that follows them.
    """
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
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
    context = _context(row, chosen[:-1])
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


def tldr_example(row: Row) -> Row:
    """``openai/summarize_from_feedback`` comparisons: ``summaries[choice]`` is preferred."""
    summaries = row["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        count = f"{len(summaries)} entries" if isinstance(summaries, list) else _kind(summaries)
        raise RowError(
            "summaries",
            f"holds {count}; a comparison needs exactly 2 {{'text', ...}} summaries; fix or remove the row",
        )
    choice = row["choice"]
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise RowError(
            "choice",
            f"has value {choice!r}; allowed values are 0 and 1 (the index of the preferred entry of "
            "'summaries'); fix or remove the row",
        )
    chosen, rejected = _summary(summaries[choice]), _summary(summaries[1 - choice])
    if chosen == rejected:
        raise RowError("summaries", "holds two identical texts, which carry no preference; remove the row")
    return {"prompt": tldr_prompt(row["info"]), "chosen": chosen, "rejected": rejected}


def tldr_prompt(info: Any) -> str:
    """``TLDR_TEMPLATE`` for a Reddit post, ``ARTICLE_TEMPLATE`` when ``post`` is null (news)."""
    if not isinstance(info, dict):
        raise RowError("info", f"is {_kind(info)}, not a {{'post', 'title', 'subreddit', ...}} struct")
    post, article = info.get("post"), info.get("article")
    if isinstance(post, str) and post.strip():
        fields = {"subreddit": info.get("subreddit"), "title": info.get("title"), "post": post}
        for name, value in fields.items():
            if not isinstance(value, str):
                problem = f"field {name!r} is {_kind(value)}, not a string; fix or remove the row"
                raise RowError("info", problem)
        return TLDR_TEMPLATE.format(**fields)
    if isinstance(article, str) and article.strip():
        return ARTICLE_TEMPLATE.format(article=article)
    raise RowError(
        "info",
        "has neither a 'post' (Reddit) nor an 'article' (news) text to summarise; fix or remove the row",
    )


def classifier_example(row: Row) -> Row:
    return {
        "prompt": _string(row["prompt"], "prompt"),
        "response": _response(row["response"], "response"),
        "label": _binary(row["label"], "label", {"good": 1.0, "bad": 0.0}, CLASSIFIER_LABELS),
    }


def prompt_of(
    fmt: str,
    row: Row,
    tokenizer: PreTrainedTokenizerBase | None = None,
    response_marker: str = "\n\nAssistant:",
) -> str:
    """The prompt of a pairwise-format row, as ``to_example`` renders it for the reward model.

    Only the columns the prompt needs are checked (e.g. identical or empty responses are fine).
    ``conversational`` rows are rendered with ``tokenizer``'s chat template and a generation
    prompt; use ``prompt_messages`` for the messages themselves.
    """
    if fmt == "conversational":
        if tokenizer is None:
            raise ValueError("prompt_of: conversational rows need a tokenizer with a chat template")
        messages = prompt_messages(row)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if fmt == "explicit":
        return _string(row["prompt"], "prompt")
    if fmt == "implicit":
        chosen, rejected = _string(row["chosen"], "chosen"), _string(row["rejected"], "rejected")
        return chosen[: _implicit_cut(chosen, rejected, response_marker)]
    if fmt == "scored":
        return _string(row["history"], "history") + SCORED_SEPARATOR
    if fmt == "tldr":
        return tldr_prompt(row["info"])
    raise ValueError(f"prompt_of: format must be one of {list(PAIRWISE)}, got {fmt!r}")


def prompt_messages(row: Row) -> list[dict[str, Any]]:
    """The messages before the reply in a ``conversational`` row: the optional ``prompt`` (see
    ``conversational_example``) and the turns before the final message of ``chosen``. ``chosen``
    may be empty when a string ``prompt`` holds the whole request."""
    chosen = row["chosen"]
    shared = _messages(chosen, "chosen")[:-1] if chosen != [] else []
    context = _context(row, shared)
    if not context:
        raise RowError(
            "chosen",
            "has no messages before the final reply and no prompt column gives one; the prompt "
            "needs at least one message",
        )
    return context


def _implicit_cut(chosen: str, rejected: str, response_marker: str) -> int:
    """Where the prompt ends: after the last ``response_marker`` of the common prefix."""
    cut = os.path.commonprefix([chosen, rejected]).rfind(response_marker)
    if cut < 0:
        raise RowError(
            "chosen",
            f"and column 'rejected' share no {response_marker!r} in their common "
            "prefix, so the prompt cannot be split off; set response_marker to the text that opens "
            "the reply, or use format='explicit' with a prompt column",
        )
    return cut + len(response_marker)


def _context(row: Row, shared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt messages of a conversational row: ``shared`` turns plus the optional ``prompt``."""
    if "prompt" not in row:
        return shared
    prompt = row["prompt"]
    if prompt is not None and not isinstance(prompt, str):
        return _messages(prompt, "prompt", allow_empty=True) + shared
    if any(message.get("role") == "user" for message in shared):
        return shared  # the string repeats the user turn (UltraFeedback)
    if prompt is None or not prompt.strip():
        raise RowError(
            "prompt",
            f"is {'empty' if prompt is not None else 'null'} and column 'chosen' has no user "
            "message before the reply; fill in the prompt or put the user turn in the messages",
        )
    return [*shared, {"role": "user", "content": prompt}]


def _summary(entry: Any) -> str:
    """A summary's ``text`` with the leading space the TL;DR prompt expects."""
    text = _response(entry.get("text") if isinstance(entry, dict) else entry, "summaries", " (text)")
    return text if text[0].isspace() else " " + text


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _string(value: Any, column: str) -> str:
    if not isinstance(value, str):
        kind = _kind(value)
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
            "is not a non-empty list of {'role', 'content'} messages; fix the row "
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
