"""Supervised fine-tuning with LoRA (or full fine-tuning): next-token cross-entropy on demonstrations."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import SumMetric

from perlhf.models import ModelConfig, build_causal_lm, load_tokenizer
from perlhf.modules.base import TrainableOnlyModule, check_training_config, default_optimizer

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100
EVAL_STAGES = ("val", "test")
SUMS = ("loss", "tokens", "correct")
"""Per-stage token sums: summed cross-entropy, trained tokens, correctly predicted tokens."""


class SFTModule(TrainableOnlyModule):
    """A causal LM fine-tuned on demonstrations: the SFT stage that RL starts from.

    The loss is the mean cross-entropy over every trained token of the batch (``labels != -100``,
    shifted by one as in Hugging Face causal LMs), so long completions weigh more than short
    ones. Validation and test report the same token mean over the whole epoch, its perplexity and
    the next-token accuracy. Under ``finetune="lora"`` the backbone stays frozen and checkpoints
    hold the adapter and optimiser state only; ``save_pretrained`` exports a peft adapter (or a
    merged model) that plain transformers + peft load; the merged export is the backbone
    (``model.name_or_path``) of the reward model and RL policy that follow.

    With gradient accumulation or several devices each micro-batch is averaged over its own
    tokens, as in most trainers; the reported validation loss is the exact epoch token mean.

    Args:
        model: Backbone, fine-tuning mode and LoRA settings.
        optimizer: Optimiser over trainable parameters only.
        scheduler: Optional LR scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        model: ModelConfig,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        model = ModelConfig.coerce(model)
        check_training_config(model, optimizer)
        self.save_plain_hyperparameters()
        self.config = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model: nn.Module | None = None
        self.tokenizer = None
        # "val_"/"test_": ModuleDict keys must not shadow nn.Module attributes such as ``train``.
        self.sums = nn.ModuleDict(
            {f"{stage}_": nn.ModuleDict({name: SumMetric() for name in SUMS}) for stage in EVAL_STAGES}
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(
            self.tokenizer_name_or_path, self.config.trust_remote_code, self.config.tokenizer_key
        )
        self.model = build_causal_lm(self.config, adapter_name="default")
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, L, V)`` for sequences ``(B, L)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def token_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed cross-entropy (float32, differentiable), number of trained tokens and number of
        correctly predicted trained tokens of a batch with ``input_ids``/``attention_mask``/
        ``labels`` ``(B, L)``. Position ``t`` predicts ``labels[:, t + 1]``."""
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, L-1, V)
        targets = batch["labels"][:, 1:]  # (B, L-1)
        mask = targets != IGNORE_INDEX
        # Only trained positions: (N, V) in float32, not the whole (B, L-1, V) block.
        picked, wanted = logits[mask].float(), targets[mask]
        loss_sum = F.cross_entropy(picked, wanted, reduction="sum")
        correct = (picked.argmax(dim=-1) == wanted).sum()
        return loss_sum, mask.sum(), correct

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss_sum, tokens, correct = self.token_sums(batch)
        loss = loss_sum / tokens.clamp(min=1)
        self.check_finite("loss", loss)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log(
            "train/token_accuracy",
            correct / tokens.clamp(min=1),
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        # Real tokens per position computed: what padding costs (``group_by_length`` raises it).
        real = batch["attention_mask"].float().mean()
        self.log("train/real_token_fraction", real, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _eval_step(self, batch: Batch, stage: str) -> None:
        sums = self.sums[f"{stage}_"]
        for name, value in zip(SUMS, self.token_sums(batch), strict=True):
            sums[name].update(value.detach().float())

    def _log_epoch(self, stage: str) -> None:
        """``{stage}/loss`` (token mean over the epoch), ``/perplexity`` and ``/token_accuracy``."""
        sums = self.sums[f"{stage}_"]
        if sums["tokens"].update_count == 0:  # no batches ran (e.g. limit_val_batches=0)
            return
        totals = {name: metric.compute() for name, metric in sums.items()}  # synced across ranks
        tokens = totals["tokens"].clamp(min=1)
        loss = totals["loss"] / tokens
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/perplexity", torch.exp(loss))
        self.log(f"{stage}/token_accuracy", totals["correct"] / tokens)
        for metric in sums.values():
            metric.reset()

    def save_pretrained(self, path: str | Path, merged: bool = False) -> Path:
        """Export in Hugging Face format: a peft adapter folder, or with ``merged`` (or under full
        fine-tuning) a plain ``transformers`` causal LM. Tokenizer included."""
        path = Path(path)
        model = self.model
        if merged and self.is_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path
