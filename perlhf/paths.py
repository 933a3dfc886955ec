"""Where the shipped recipes live: ``configs/`` of a checkout, or ``perlhf/configs`` in a wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def configs_dir(name: str = "") -> Path:
    """The folder of shipped configs (``name``: a sub-folder such as ``quickstart``).

    An installed wheel carries them as package data under ``perlhf/configs`` (pyproject's
    ``package-dir`` maps the repository's top-level ``configs/`` there); a checkout run with the
    package on ``PYTHONPATH`` (or installed editable) reads ``configs/`` beside ``perlhf/``.
    """
    packaged = files("perlhf") / "configs"
    root = Path(str(packaged)) if packaged.is_dir() else CHECKOUT_CONFIGS
    folder = root / name if name else root
    if not folder.is_dir():
        raise FileNotFoundError(
            f"shipped configs {folder} not found: perlhf was installed without its configs/ folder; "
            "reinstall it from a wheel or a checkout (pip install perlhf)"
        )
    return folder
