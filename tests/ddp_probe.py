"""A callback the DDP tests add to CLI runs: it records what each rank saw and ended with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from safetensors.torch import save_file


class ReplicaProbe(L.Callback):
    """Write ``<out>/rank<r>.safetensors`` (this rank's trainable tensors at the end of fit) and
    ``<out>/rank<r>.json`` (per-step loss or mean raw reward, KL coefficient, running reward
    statistics, world size, the last logged metrics)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []
        self.rewards: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "raw_scores" in batch:
            self.rewards.append(batch["raw_scores"].float().mean().item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad
        }
        save_file(trainable, self.out / f"rank{rank}.safetensors")
        moments = getattr(trainer.datamodule, "moments", None)
        record = {
            "world_size": trainer.world_size,
            "losses": self.losses,
            "rewards": self.rewards,
            "kl_coef": getattr(getattr(pl_module, "kl_ctl", None), "value", None),
            "moments": moments.state_dict() if moments is not None else None,
            "rollouts_drawn": getattr(trainer.datamodule, "rollouts_drawn", None),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
