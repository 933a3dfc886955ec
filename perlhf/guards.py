"""One non-finite guard for every perlhf module: loss, gradient norm and parameters.

A NaN or inf in training is never recoverable by training on: it spreads through the optimiser
state into every weight. The guard stops the run at the first one, on every rank together (the
decision is all-reduced), after checkpointing the last good state, and names the step and the
quantity. Parameters are checked after every update, before ``ModelCheckpoint`` writes, so no
checkpoint on disk (and no export: see ``ExportPretrained``) ever holds a non-finite weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf appeared in a training quantity; the run stopped (see the message for the state)."""


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding a NaN or inf (local shards under sharding)."""
    return [n for n, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def agreed(trainer: L.Trainer | None, ok: bool) -> bool:
    """``ok`` on every rank (one all-reduce; the same answer everywhere)."""
    if trainer is not None and trainer.world_size > 1:
        return trainer.strategy.reduce_boolean_decision(ok, all=True)
    return ok


def stop(module: L.LightningModule, quantity: str, where: str, save_as: str | None = None) -> None:
    """Raise ``NonFiniteError`` about ``quantity`` at ``where`` (call on every rank at once).

    When the trainable parameters are still finite, the state in memory is the last good one and is
    checkpointed to ``<log_dir>/nan-guard/<save_as>`` (default ``step-<global step>.ckpt``) first;
    otherwise nothing is written and the message names the newest checkpoint on disk.
    """
    trainer = module.trainer
    bad = nonfinite_parameters(module)
    if agreed(trainer, not bad):
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = root / "nan-guard" / (save_as or f"step-{trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        saved = f"the last good state is saved at {path}"
    else:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        shown = ", ".join(bad[:3]) or "on another rank"
        saved = (
            f"parameters are non-finite too ({shown}), so this state is not saved; "
            f"the last good checkpoint is {last or 'none (no checkpoint was written yet)'}"
        )
    raise NonFiniteError(
        f"non-finite {quantity} at {where}; {saved} — resume with --ckpt_path after fixing the "
        "cause (learning rate, data, reward scale, precision)"
    )


def check_finite(module: L.LightningModule, quantity: str, tensor: torch.Tensor, **kwargs: Any) -> None:
    """Stop the run (``stop``) unless ``tensor`` is finite on every rank."""
    if agreed(module._trainer, bool(torch.isfinite(tensor).all())):
        return
    where = kwargs.pop("where", f"optimiser step {module.trainer.global_step}")
    stop(module, quantity, where, **kwargs)


class NonFiniteGuard(L.Callback):
    """Checks the gradient norm before every optimiser step and the updated parameters after every
    training batch (before checkpoint callbacks write). Every perlhf module adds it itself
    (``configure_callbacks``); modules check their losses with ``check_finite``."""

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # float16 loss scaling: an inf gradient is expected, and the scaler skips that step
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads]))
        if not agreed(trainer, bool(torch.isfinite(norm))):
            stop(pl_module, f"gradient norm ({norm.item()})", f"optimiser step {trainer.global_step}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bad = nonfinite_parameters(pl_module)
        if not agreed(trainer, not bad):
            quantity = f"parameters after the update ({', '.join(bad[:3]) or 'on another rank'})"
            stop(pl_module, quantity, f"optimiser step {trainer.global_step}")
