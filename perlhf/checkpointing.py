"""Durable checkpoints: atomic writes, a checkpoint on Ctrl-C / SIGTERM / exceptions, clear errors.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file in the target folder, syncs it
and ``os.replace``s it over the old one, so a crash or a full disk mid-write leaves the previous
checkpoint intact. ``DurableCheckpoints`` (added by every perlhf module) installs it, turns
SIGINT/SIGTERM into "finish this step, write ``last.ckpt``, stop", and writes ``last.ckpt`` when
training dies of an exception, so at most the step in flight is lost.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from perlhf.data.sampler import ResumableDataLoader
from perlhf.guards import NonFiniteError


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside the target, ``fsync``, then ``os.replace``.

    Local paths only (remote URLs go through Lightning's own ``TorchCheckpointIO``). Reading an
    unreadable file (truncated, not a checkpoint) raises a ``ValueError`` naming it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(
                err.errno,
                f"could not write checkpoint {path}: {err.strerror or err}; the previous {path.name} "
                "(if any) is unchanged — free disk space or point ModelCheckpoint(dirpath=...) elsewhere",
            ) from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, ValueError) as err:
            raise ValueError(unreadable_checkpoint(path, err)) from err


def unreadable_checkpoint(path: Any, err: BaseException) -> str:
    detail = (str(err).splitlines() or [""])[0][:200]
    return (
        f"checkpoint {path} cannot be read ({type(err).__name__}: {detail}); it is "
        "truncated, corrupt or not a Lightning checkpoint — pass another --ckpt_path (e.g. an earlier "
        "checkpoint of the same run)"
    )


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where ``last.ckpt`` goes: the ``ModelCheckpoint`` folder (None: checkpointing is off)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return None


class DurableCheckpoints(L.Callback):
    """Atomic checkpoint writes, and ``last.ckpt`` on SIGINT/SIGTERM and on exceptions (in the
    ``ModelCheckpoint`` folder; with checkpointing off a signal still stops cleanly, unsaved).

    A signal during ``fit`` lets the current step finish, writes ``last.ckpt`` (which resumes
    exactly, like any step checkpoint) and stops with ``KeyboardInterrupt`` (SIGINT) or
    ``SIGTERMException``; a second signal stops at once. An exception writes ``last.ckpt`` of
    the state before the failed step, unless it came from the non-finite guard (that state is
    not good) or from a checkpoint write.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._saved = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signal, self._saved = None, False
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # a second signal: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self._signal = signum
        rank_zero_info(f"received {signal.Signals(signum).name}: finishing this step, then writing last.ckpt")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self._signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = last_checkpoint_path(trainer)
        if path is None:
            rank_zero_info(f"stopping at step {trainer.global_step}; checkpointing is off, nothing saved")
        else:
            trainer.save_checkpoint(path)
            rank_zero_info(f"saved {path} at step {trainer.global_step}; resume with --ckpt_path {path}")
        self._saved = True
        self._restore_handlers()
        raise SIGTERMException if self._signal == signal.SIGTERM else KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        skip = (NonFiniteError, CheckpointWriteError, SIGTERMException)
        fitting = trainer.state.fn == TrainerFn.FITTING
        path = last_checkpoint_path(trainer)
        if self._saved or not fitting or isinstance(exception, skip) or not trainer.global_step or not path:
            return
        # The batch in flight was not trained: resume with it, not after it.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for loader in getattr(trainer.fit_loop._combined_loader, "flattened", []):
            if isinstance(loader, ResumableDataLoader):
                loader.batches_yielded = done
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"training failed ({type(exception).__name__}); saved {path} at step {trainer.global_step}"
        )
