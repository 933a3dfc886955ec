"""Stages run in order: check a stage's inputs before it starts, and find a run's last checkpoint.

A recipe is a chain of configs (``sft.yaml`` → ``reward.yaml`` → ``reinforce.yaml``): each stage
reads what an earlier one exported (``ExportPretrained(dirpath=...)``) or what a prepare step
wrote. ``missing_inputs`` names, for every local path a config reads that does not exist yet, the
config beside it that writes it, or the prepare command, so the user sees "run sft.yaml first"
instead of a loader's error. ``last_checkpoint`` resolves ``--ckpt_path last`` to the newest
``last.ckpt`` of the config's logger folder, whichever ``version_N`` holds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

PREPARE_STEPS = {
    "checkpoints/quickstart": "perlhf quickstart --prepare-only",
    "checkpoints/quickstart-vlm": "perlhf quickstart-vlm --prepare-only",
    "checkpoints/real": "perlhf quickstart-real --prepare-only",
}
"""Default roots of the built-in pipelines -> the command that writes their models and data."""


class StageOrderError(FileNotFoundError):
    """A stage was started before the stage (or prepare step) that writes its inputs."""


MODEL_PATHS = ("model.name_or_path", "model.tokenizer", "policy_adapter", "reference_model", "value_model")
"""``model.init_args`` keys that may name a local model folder."""
DATA_PATHS = ("reward_model", "reward_base", "tokenizer", "path", "data_files")
"""``data.init_args`` keys that may name a local model folder or data file."""


def missing_inputs(config: dict[str, Any], config_files: list[str]) -> str | None:
    """A message naming each local input of ``config`` (a subcommand's dumped config) that does not
    exist and the stage that writes it; None when every input is there."""
    producers = _exports(config_files)
    lines = []
    for key, value in _inputs(config):
        if Path(value).expanduser().exists():
            continue
        where = f"{key}={value!r}"
        producer = next((f for d, f in producers if _under(value, d)), None)
        prepare = next((c for root, c in PREPARE_STEPS.items() if _under(value, root)), None)
        if producer:
            lines.append(f"{where} is written by {producer}: run `perlhf fit --config {producer}` first")
        elif prepare:
            lines.append(f"{where} is written by the prepare step: run `{prepare}` first")
        else:
            lines.append(
                f"{where}: no such folder or file (relative paths resolve from {Path.cwd()}), and no "
                "config beside this one exports it; run the stage that writes it, or fix the path"
            )
    if not lines:
        return None
    # The prepare step comes before any stage.
    lines.sort(key=lambda line: "prepare step" not in line)
    return "inputs of this stage are missing:\n  " + "\n  ".join(lines)


def _inputs(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(dotted key, value)`` of each value in ``config`` that can only be a local path."""
    groups = {"model": MODEL_PATHS, "data": DATA_PATHS}
    for group, keys in groups.items():
        args = (config.get(group) or {}).get("init_args") or {}
        for key in keys:
            value: Any = args
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            for suffix, path in _strings(value):
                if _looks_local(path):
                    yield f"{group}.init_args.{key}{suffix}", path


def _strings(value: Any, suffix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield suffix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{suffix}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{suffix}[{index}]")


def _looks_local(value: str) -> bool:
    """Absolute, ``./``/``~`` or more than one ``/`` (hub ids are ``org/name``); no URL or glob."""
    if "://" in value or any(c in value for c in "*?["):
        return False
    return value.startswith(("/", ".", "~")) or value.count("/") > 1


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _exports(config_files: list[str]) -> list[tuple[str, str]]:
    """``(export dirpath, config file)`` of every ``ExportPretrained`` callback in the YAML files
    beside ``config_files`` (the recipe's other stages), the given files themselves excluded."""
    given = {Path(f).resolve() for f in config_files}
    folders = dict.fromkeys(Path(f).parent for f in config_files)
    out = []
    for folder in folders:
        for candidate in sorted(folder.glob("*.yaml")):
            if candidate.resolve() in given:
                continue
            try:
                recipe = yaml.safe_load(candidate.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            callbacks = ((recipe.get("trainer") or {}) if isinstance(recipe, dict) else {}).get("callbacks")
            for callback in callbacks or []:
                if not isinstance(callback, dict) or not str(callback.get("class_path", "")).endswith(
                    "ExportPretrained"
                ):
                    continue
                dirpath = (callback.get("init_args") or {}).get("dirpath")
                if dirpath:
                    out.append((dirpath, str(candidate)))
    return out


def last_checkpoint(config: dict[str, Any]) -> Path:
    """The newest ``last.ckpt`` written under this config's logger folder
    (``<save_dir>/<name>/version_*/checkpoints/``) or a ``ModelCheckpoint`` ``dirpath``."""
    trainer = config.get("trainer") or {}
    root = trainer.get("default_root_dir") or "."
    places = []
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if logger is False:
            continue
        args = (logger or {}).get("init_args", {}) if isinstance(logger, dict) else {}
        save_dir = args.get("save_dir") or root
        name = args.get("name", "lightning_logs") or ""
        places.append(Path(save_dir) / name)
    candidates = [p for place in places for p in place.glob("version_*/checkpoints/last.ckpt")]
    for callback in trainer.get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath") if isinstance(callback, dict) else None
        if dirpath and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            candidates += list(Path(dirpath).glob("last*.ckpt"))
    if not candidates:
        looked = ", ".join(f"{p}/version_*/checkpoints/" for p in places) or "no logger folder"
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {looked}; train this config first "
            "(perlhf fit --config ...), or give the checkpoint's path"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
