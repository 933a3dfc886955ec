"""Where a model comes from: a local folder, the Hugging Face cache, or the hub — checked up front.

``from_pretrained`` on a hub id with no way to reach the hub retries with back-off for a minute
or more per file and then fails without saying which setting asked for the download.
``check_model_source`` decides in seconds instead: a missing local path, a hub id in offline mode
that is not cached, or a hub that does not answer one request are errors that name the config
key, its value and the fix (a local folder, ``HF_HUB_OFFLINE=1`` with a cached copy, or network).
"""

from __future__ import annotations

from pathlib import Path

PROBE_TIMEOUT_S = 5.0
"""Seconds the one request to the hub endpoint may take before the hub counts as unreachable."""

_reachable: set[str] = set()  # endpoints that answered in this process


def check_model_source(name_or_path: str, what: str = "model.name_or_path") -> None:
    """Raise unless ``name_or_path`` can be loaded without a long wait: an existing local path,
    or a hub id that is cached (offline mode) or whose hub answers. ``what`` is the config key
    named in errors.

    A value that can only be a local path (absolute, ``./``, ``~``, or more than one ``/``: hub ids
    are ``org/name``) must exist; say so instead of transformers' "Repo id must be…"."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    shown = f"{what}={name_or_path!r}"
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"{shown}: no such folder (relative paths resolve from {Path.cwd()}); run the stage "
            "that writes it first, or give an existing folder or a hub id (org/name)"
        )
    check_hub_id(name_or_path, shown)


def check_hub_id(repo_id: str, shown: str) -> None:
    """Raise if the hub model ``repo_id`` can be neither read from the cache (offline mode) nor
    downloaded (the hub endpoint does not answer); ``shown`` is ``key='value'`` for the error."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cached = is_cached(repo_id)
    local = (
        f"is not a local folder (relative paths resolve from {Path.cwd()}), so it names a Hugging "
        "Face hub model"
    )
    if constants.HF_HUB_OFFLINE:
        if cached:
            return
        raise FileNotFoundError(
            f"{shown} {local}, and HF_HUB_OFFLINE is set but the model is not in the cache {cache}: "
            "give a local folder (a save_pretrained/from_pretrained layout), download it first where "
            f"there is network (`hf download {repo_id}`) and keep HF_HUB_OFFLINE=1, or unset "
            "HF_HUB_OFFLINE on a machine that reaches the hub"
        )
    endpoint = constants.ENDPOINT
    problem = probe(endpoint)
    if problem is None:
        return
    if cached:
        fix = "a copy is in the cache: set HF_HUB_OFFLINE=1 to load it without contacting the hub"
    else:
        fix = (
            f"it is not in the cache {cache} either: give a local folder (a save_pretrained/"
            "from_pretrained layout), run where the hub is reachable, or download it there and set "
            "HF_HUB_OFFLINE=1"
        )
    raise ConnectionError(f"{shown} {local}, but {endpoint} cannot be reached ({problem}); {fix}")


def is_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of the hub model ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshots = folder / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def probe(endpoint: str) -> str | None:
    """None if one request to ``endpoint`` gets any HTTP answer within ``PROBE_TIMEOUT_S``, else what
    went wrong. Goes through huggingface_hub's own session, so its proxy settings apply."""
    if endpoint in _reachable:
        return None
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # any transport failure means the download would fail the same way
        return f"{type(err).__name__}: {err}"
    _reachable.add(endpoint)
    return None
