"""What every perlhf LightningModule shares: trainable-only checkpoints and optimisers."""

from __future__ import annotations

import abc
import copy
import inspect
import random
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from perlhf import quiet
from perlhf.checkpointing import DurableCheckpoints
from perlhf.guards import NonFiniteGuard, check_finite
from perlhf.models import ModelConfig

WRAPPED_FSDP = "_fsdp_wrapped_module."
WRAPPED_CHECKPOINT = "_checkpoint_wrapped_module."


class TrainableOnlyModule(L.LightningModule, abc.ABC):
    """Base for modules whose checkpoints hold only what was trained (abstract: the CLI lists only
    the concrete modules as ``--model`` choices).

    A LoRA run's default Lightning checkpoint would carry the frozen backbone (gigabytes); here
    ``state_dict`` entries of frozen parameters are dropped on save, and loading checks that every
    saved tensor lands and that no trainable tensor is missing. Under ``finetune="full"`` every
    parameter trains, so the checkpoint is the whole model.

    Subclasses set ``self.config`` (a ``ModelConfig``), build their networks in
    ``configure_model`` and set ``self.optimizer`` / ``self.scheduler`` (injected by
    LightningCLI as callables).
    """

    config: ModelConfig
    optimizer: OptimizerCallable
    scheduler: LRSchedulerCallable | None

    def __init__(self) -> None:
        super().__init__()
        quiet.install()  # again here: a test runner may have reset the filters since import
        # Frozen tensors are absent from our checkpoints by design; on_load_checkpoint checks the rest.
        self.strict_loading = False

    @abc.abstractmethod
    def configure_model(self) -> None:
        """Build the networks once (idempotent), so strategies and precision plugins control it."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path, merged: bool = False) -> Path:
        """Export in Hugging Face format (a peft adapter folder, or ``merged`` weights)."""

    @property
    def tokenizer_name_or_path(self) -> str:
        """What the DataModules load the tokenizer from (``tokenizer_name_from``)."""
        return self.config.tokenizer_name_or_path

    @property
    def is_lora(self) -> bool:
        return self.config.finetune == "lora"

    def save_plain_hyperparameters(self) -> None:
        """``save_hyperparameters`` for the subclass ``__init__`` calling this, with dataclass
        values stored as dicts so checkpoints load with ``torch.load(weights_only=True)``.
        Injected optimiser/scheduler callables are left out (LightningCLI records their config).
        """
        frame = inspect.currentframe().f_back
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], frame=frame)
        for key, value in list(self.hparams.items()):
            if is_dataclass(value):
                self.hparams[key] = asdict(value)

    def trainable_names(self) -> set[str]:
        """State-dict names of trainable parameters (wrapper prefixes that FSDP or activation
        checkpointing insert into parameter names, but not into state-dict keys, removed)."""
        names = (name for name, p in self.named_parameters() if p.requires_grad)
        return {name.replace(WRAPPED_FSDP, "").replace(WRAPPED_CHECKPOINT, "") for name in names}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` for trainable-only checkpoints: the frozen tensors a
        checkpoint leaves out by design are not reported missing (``load_from_checkpoint`` would
        list each one); a missing trainable tensor, or an unexpected one, still is (and raises
        under ``strict``)."""
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = self.trainable_names()
        keys = keys._replace(missing_keys=[k for k in keys.missing_keys if k in trainable])
        if strict and (keys.missing_keys or keys.unexpected_keys):
            raise RuntimeError(
                f"state dict does not match the trainable tensors (missing: {keys.missing_keys[:5]}, "
                f"unexpected: {keys.unexpected_keys[:5]})"
            )
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = pinned_paths(checkpoint["hyper_parameters"])
        # Dropout draws from the global generators; restoring them makes a resumed run take the
        # same steps as an uninterrupted one.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Sharding strategies (FSDP, DeepSpeed) load the weights themselves and hand over the rest.
        saved = set(checkpoint.get("state_dict", ()))
        unexpected = saved - set(self.state_dict()) if saved else set()
        missing = self.trainable_names() - saved if "state_dict" in checkpoint else set()
        if unexpected or missing:
            raise RuntimeError(
                "checkpoint does not match this model's trainable tensors "
                f"(unexpected: {sorted(unexpected)[:5]}, missing: {sorted(missing)[:5]}); was it "
                "written with a different finetune mode, LoRA rank or target_modules?"
            )
        # Restored when training starts, after whatever the resume itself draws (sanity checks).
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        rng, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def configure_callbacks(self) -> list[L.Callback]:
        """Every perlhf module runs with the non-finite guard and durable checkpoints."""
        return [NonFiniteGuard(), DurableCheckpoints()]

    def check_finite(self, quantity: str, tensor: torch.Tensor) -> None:
        """Stop the run, checkpointing the last good state, unless ``tensor`` is finite everywhere."""
        check_finite(self, quantity, tensor)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check model.finetune and model.lora")
        optimizer = self.optimizer(params)
        if self.scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"},
        }


LOCAL_PATH_KEYS = ("name_or_path", "tokenizer", "value_model", "reference_model")
"""Hyperparameters that may name a local model folder."""


def pinned_paths(hparams: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``hparams`` whose local model folders are absolute (symlinks resolved), so that
    ``load_from_checkpoint`` works from any working directory and on the exact base it trained on."""
    out = copy.deepcopy(dict(hparams))
    for tree in (out, out.get("model")):
        if not isinstance(tree, dict):
            continue
        for key in LOCAL_PATH_KEYS:
            value = tree.get(key)
            if isinstance(value, str) and value and Path(value).exists():
                tree[key] = str(Path(value).resolve())
    return out


def check_training_config(model: ModelConfig, optimizer: OptimizerCallable) -> None:
    """Construction-time checks of what ``ModelConfig`` and torch would only reject mid-run:
    the LoRA dropout and scale, and the optimiser's arguments (built once on a dummy tensor)."""
    if not 0.0 <= model.lora.dropout < 1.0:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {model.lora.dropout}")
    if model.lora.alpha <= 0:
        raise ValueError(f"model.lora.alpha must be > 0, got {model.lora.alpha}")
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizer: {err} (model.init_args.optimizer.init_args)") from err


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW, lr 1e-4, weight decay 0.01 (torch's other defaults)."""
    return torch.optim.AdamW(params, lr=1e-4)
