"""The ``perlhf`` command: LightningCLI (``perlhf fit --config configs/quickstart/reward.yaml``) and
the built-in pipelines (``perlhf quickstart``)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml
from jsonargparse import DefaultHelpFormatter, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

import perlhf.callbacks  # noqa: F401  (registers callbacks for short names in configs)
import perlhf.data  # noqa: F401  (registers DataModules)
import perlhf.modules  # noqa: F401  (registers LightningModules)
from perlhf.checkpointing import unreadable_checkpoint
from perlhf.stages import StageOrderError, last_checkpoint, missing_inputs

PIPELINES = {
    "quickstart": "perlhf.quickstart",
    "quickstart-vlm": "perlhf.quickstart_vlm",
    "quickstart-real": "perlhf.quickstart_real",
}
"""``perlhf <name> ...`` runs ``python -m <module> ...``: the built-in offline pipelines."""
DESCRIPTION = (
    "perlhf: parameter-efficient RLHF. `perlhf fit --config CONFIG.yaml` trains one stage "
    "(LightningCLI; `perlhf fit --model.help PPOModule` lists a module's settings, "
    "`--model.ppo.help` a group's). `perlhf quickstart [--prepare-only]` runs the offline "
    "pipeline (also quickstart-vlm, quickstart-real)."
)
NESTED_HELP = re.compile(r"--(model|data)\.(?:init_args\.)?(\w+)\.help")

APPLIED_ON_RESUME = ("center_coef", "ppo.", "log_samples_every", "max_rollouts")
"""Module arguments (dotted) that a resumed run may change: read afresh at every step."""


class PerlhfCLI(LightningCLI):
    """``LightningCLI`` whose ``--ckpt_path`` never replaces the config.

    Lightning's CLI overwrites the model's config with the checkpoint's hyperparameters, so a value
    given for the resumed run would be dropped without a word. Here the config is what runs: a
    checkpoint of another module class is refused; values that differ from the checkpoint's are
    applied when they are read afresh every step (``APPLIED_ON_RESUME``, each one reported) and
    refused otherwise (the model's shape, the optimiser, whose state the checkpoint restores, the
    KL controller, whose state it restores too).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, without its warning when ``args`` are given while ``sys.argv`` holds another
        command line: perlhf's own callers (``perlhf quickstart``'s stages, tests) do that on purpose."""
        if isinstance(args, dict | Namespace):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def _dumped(self, subcommand: str) -> dict[str, Any]:
        """The subcommand's config as plain YAML values (class paths, link targets included)."""
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_unset=False))
        return dump[subcommand]

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":  # the newest last.ckpt of this config's runs, whichever version_N
            ckpt_path = str(last_checkpoint(self._dumped(subcommand)))
            self.config[subcommand]["ckpt_path"] = ckpt_path
            print(f"--ckpt_path last: {ckpt_path}", file=sys.stderr)
        if not ckpt_path or not Path(ckpt_path).is_file():  # absent, or "last"/"best" for the Trainer
            return
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise ValueError(unreadable_checkpoint(ckpt_path, err)) from err
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved.pop("_instantiator", None)
        saved_class = saved.pop("_class_path", None)
        model = self._dumped(subcommand)["model"]
        if saved_class and saved_class != model["class_path"]:
            raise ValueError(
                f"--ckpt_path {ckpt_path} was written by {saved_class}, but this config trains "
                f"{model['class_path']}; pass a checkpoint of a {model['class_path'].rsplit('.', 1)[-1]} "
                "run, or the config that wrote this checkpoint"
            )
        given, before = _flat(model.get("init_args", {})), _flat(saved)
        differ = sorted(k for k in before.keys() & given.keys() if not _same(before[k], given[k]))
        refused = [k for k in differ if not k.startswith(APPLIED_ON_RESUME)]
        if refused:
            lines = "; ".join(
                f"model.init_args.{k}: checkpoint {before[k]!r}, config {given[k]!r}" for k in refused
            )
            raise ValueError(
                f"--ckpt_path {ckpt_path} was trained with other values than this config: {lines}. These "
                "cannot change on resume (they shape the trained tensors or their restored state); use the "
                "checkpoint's values, or start a new run without --ckpt_path"
            )
        for key in differ:
            print(
                f"resuming {ckpt_path} with model.init_args.{key}={given[key]!r} (was {before[key]!r})",
                file=sys.stderr,
            )

    def before_instantiate_classes(self) -> None:
        """A stage whose inputs an earlier stage writes stops here, naming that stage's command."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:  # parse-only use (run=False): nothing will be loaded
            return
        files = [str(p) for p in self.config[subcommand].get("config") or []]
        problem = missing_inputs(self._dumped(subcommand), files)
        if problem:
            raise StageOrderError(problem)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's Trainer, with ``StepsProgressBar`` in place of the default rich bar."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        default_bar = not any(isinstance(c, ProgressBar) for c in callbacks)
        if config.get("enable_progress_bar") is not False and default_bar and _RICH_AVAILABLE:
            kwargs.setdefault("callbacks", [*callbacks, StepsProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        """Checks that need both the module and the DataModule, before any model is loaded."""
        # getattr: a caller may skip instantiation (parse-only tools), leaving neither attribute.
        algorithm = getattr(getattr(self, "model", None), "algorithm", None)
        samples = getattr(getattr(self, "datamodule", None), "samples_per_prompt", None)
        if algorithm in ("rloo", "grpo") and samples is not None and samples < 2:
            raise ValueError(
                f"model.init_args.algorithm={algorithm!r} needs data.init_args.samples_per_prompt >= 2 "
                f"(its baseline compares the samples of one prompt), got {samples}"
            )


def _same(saved: Any, given: Any) -> bool:
    """Equal values; a local path also equals the absolute one checkpoints record."""
    if isinstance(saved, str) and isinstance(given, str) and saved != given and Path(given).exists():
        return Path(given).resolve() == Path(saved).resolve()
    return saved == given


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.")
    return out


class StepsProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the ``Epoch 0/-2`` it shows when only ``max_steps``
    bounds a run (the Trainer's ``max_epochs`` is then -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs == -1:
            text = text.replace(f"Epoch {current_epoch}/-2", f"Epoch {current_epoch}")
        return text


class HelpFormatter(DefaultHelpFormatter):
    """Help that shows what a default is. argparse re-wraps help text, which would show
    ``response_marker``'s ``"\\n\\nAssistant:"`` as ``Assistant:``: such string defaults (and the
    empty string) are shown as Python literals. A perlhf function default (``default_optimizer``,
    given by its import path) is shown with the first line of its docstring, which says what it
    builds (optimiser, lr)."""

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        default = action.default
        if isinstance(default, str) and (not default or default != " ".join(default.split())):
            text = text.replace("%(default)s", repr(default))
        elif isinstance(default, str) and default.startswith("perlhf."):
            module, _, name = default.rpartition(".")
            function = getattr(sys.modules.get(module), name, None)
            if inspect.isfunction(function) and function.__doc__:
                summary = function.__doc__.strip().splitlines()[0].rstrip(".")
                text = text.replace("%(default)s", f"{default} ({summary})")
        return text


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser with ``HelpFormatter``; the parsers jsonargparse makes for ``--model.help
    CLASS`` are of this type too, so they format defaults the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def nested_help(args: list[str]) -> bool:
    """Serve ``--model.ppo.help`` / ``--model.kl.help`` (any dataclass-typed argument of the
    ``--model`` or ``--data`` class): jsonargparse offers these flags in subclass mode but cannot
    forward them, so the help is printed by a parser of that one class. False if not asked."""
    asked = next((m for m in map(NESTED_HELP.fullmatch, args) if m), None)
    if asked is None:
        return False
    group, field = asked.groups()
    cls = _chosen_class(args, group)
    hints = typing.get_type_hints(cls.__init__)
    kind = next((t for t in typing.get_args(hints.get(field)) or (hints.get(field),) if t), None)
    if not dataclasses.is_dataclass(kind):
        return False
    parser = ArgumentParser(prog="perlhf fit")
    parser.add_class_arguments(cls, group, fail_untyped=False, sub_configs=True)
    parser.parse_args([f"--{group}.{field}.help"])  # prints the group's help and exits
    return True


def _chosen_class(args: list[str], group: str) -> type:
    """The class of ``--model``/``--data`` (a name or class path) or of the ``--config`` file's."""
    name = None
    for i, arg in enumerate(args):
        if arg in (f"--{group}", f"--{group}.help") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith((f"--{group}=", f"--{group}.help=")):
            name = arg.split("=", 1)[1]
        elif arg in ("-c", "--config") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            recipe = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            name = (recipe.get(group) or {}).get("class_path", name)
    if not name:
        example = f"--{group} PPOModule --{group}.kl.help" if group == "model" else f"--{group} <class>"
        raise SystemExit(f"--{group}.<field>.help: name the class first, e.g. {example}")
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    package = perlhf.modules if group == "model" else perlhf.data
    if not hasattr(package, name):
        raise SystemExit(f"--{group} {name}: not a class of {package.__name__}")
    return getattr(package, name)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Any perlhf module with any perlhf DataModule (subclass mode); optimiser and scheduler are
    injected into the module (``auto_configure_optimizers=False``). Runs go under ``checkpoints/``.
    Field docstrings of the config dataclasses (``ModelConfig``, ``LoraSpec``, ``PPOSpec``…) are
    the ``--help`` text.
    """
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if nested_help(list(sys.argv[1:] if args is None else args)):
        raise SystemExit(0)
    return PerlhfCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "checkpoints"},
        parser_class=ArgumentParser,
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The ``perlhf`` console script: ``perlhf quickstart ...`` or any LightningCLI command."""
    given = sys.argv[1:] if args is None else args
    if given and given[0] in PIPELINES:
        importlib.import_module(PIPELINES[given[0]]).main(given[1:])
        return
    try:
        cli_main(args)
    except StageOrderError as err:  # a message for the user, not a traceback
        raise SystemExit(f"perlhf: {err}") from None


if __name__ == "__main__":
    main()
