"""Reward modelling with LoRA: Bradley–Terry on preference pairs, or BCE on good/bad labels."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from perlhf.data.images import load_processor
from perlhf.losses import classifier_loss, pairwise_loss
from perlhf.models import ModelConfig, build_reward_model, load_tokenizer
from perlhf.modules.base import TrainableOnlyModule, check_training_config, default_optimizer
from perlhf.scoring import sequence_scores
from perlhf.vlm import VisionRewardModel

Batch = dict[str, torch.Tensor]
STAGES = ("train", "val", "test")


class RewardModule(TrainableOnlyModule):
    """A reward model: backbone + LoRA on the attention projections + a trainable scalar head.

    ``objective="pairwise"`` trains on batches whose first half is chosen and second half
    rejected (one forward pass for both) with ``-log σ(r_c − r_r − margin)``; ``"classifier"``
    trains on good/bad labels with binary cross-entropy (the paper's UI-automation and VQA
    reward models). Checkpoints hold the adapter, the head and optimiser state only;
    ``save_pretrained`` exports a peft adapter (or a merged model) that plain transformers +
    peft load. A vision-language backbone scores image prompts the same way (a
    ``perlhf.vlm.VisionRewardModel``; batches carry the images' pixel inputs under ``vision``).

    Args:
        model: Backbone, fine-tuning mode and LoRA settings.
        objective: ``pairwise`` (Bradley–Terry on preference pairs) or ``classifier`` (BCE).
        center_coef: Weight of the centre-rewards regulariser ``mean((r_c + r_r)²)``; 0 disables.
        optimizer: Optimiser over trainable parameters only.
        scheduler: Optional LR scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        model: ModelConfig,
        objective: Literal["pairwise", "classifier"] = "pairwise",
        center_coef: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if objective not in ("pairwise", "classifier"):
            raise ValueError(f"objective must be 'pairwise' or 'classifier', got {objective!r}")
        model = ModelConfig.coerce(model)
        check_training_config(model, optimizer)
        self.save_plain_hyperparameters()
        self.config = model
        self.objective = objective
        self.center_coef = center_coef
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.processor = None  # a VLM backbone's processor (exported with the model)
        self.metrics = nn.ModuleDict({f"{stage}_": self._make_metrics(stage) for stage in STAGES})

    def _make_metrics(self, stage: str) -> nn.ModuleDict:
        if self.objective == "pairwise":
            names = ("accuracy", "chosen_reward", "rejected_reward", "margin")
            return nn.ModuleDict({name: MeanMetric() for name in names})
        metrics = {"accuracy": BinaryAccuracy(), "reward": MeanMetric()}
        if stage != "train":
            metrics["auroc"] = BinaryAUROC()
        return nn.ModuleDict(metrics)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.config.trust_remote_code)
        self.model = build_reward_model(self.config, pad_token_id=self.tokenizer.pad_token_id)
        if isinstance(self.model, VisionRewardModel):
            self.processor = load_processor(self.tokenizer_name_or_path, self.config.trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision: torch.Tensor
    ) -> torch.Tensor:
        """Scalar rewards ``(N,)`` in float32 for sequences ``(N, L)`` (and a VLM's image inputs),
        padded on either side with any id (``perlhf.scoring.sequence_scores``)."""
        return sequence_scores(self.model, input_ids, attention_mask, **vision)

    def _shared_step(self, batch: Batch, stage: str) -> torch.Tensor:
        self._check_batch(batch)
        rewards = self(batch["input_ids"], batch["attention_mask"], **batch.get("vision", {}))
        metrics = self.metrics[f"{stage}_"]
        if self.objective == "pairwise":
            chosen, rejected = rewards.chunk(2)
            loss = pairwise_loss(chosen, rejected, batch.get("margin"), self.center_coef)
            values = {
                "accuracy": (chosen > rejected).float(),
                "chosen_reward": chosen.detach(),
                "rejected_reward": rejected.detach(),
                "margin": (chosen - rejected).detach(),
            }
            for name, value in values.items():
                metrics[name].update(value)
        else:
            labels = batch["labels"]
            loss = classifier_loss(rewards, labels)
            probs = torch.sigmoid(rewards.detach())
            metrics["accuracy"].update(probs, labels.long())
            metrics["reward"].update(rewards.detach())
            if "auroc" in metrics:
                metrics["auroc"].update(probs, labels.long())
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=rewards.shape[0],
            sync_dist=True,  # the epoch mean over every rank's batches
        )
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "accuracy")
        return loss

    def _check_batch(self, batch: Batch) -> None:
        has_labels = "labels" in batch
        if self.objective == "pairwise" and has_labels:
            raise ValueError(
                "the DataModule yields classifier batches (good/bad labels) but RewardModule has "
                "objective='pairwise'; set model.init_args.objective: classifier"
            )
        if self.objective == "classifier" and not has_labels:
            raise ValueError(
                "RewardModule has objective='classifier' but the batch has no 'labels'; use a "
                "classifier dataset (prompt/response/label columns) or objective: pairwise"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.check_finite("loss", loss)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Rewards per example: ``chosen``/``rejected`` ``(B,)`` for pairs, ``rewards`` otherwise."""
        rewards = self(batch["input_ids"], batch["attention_mask"], **batch.get("vision", {}))
        if self.objective == "pairwise" and "labels" not in batch:
            chosen, rejected = rewards.chunk(2)
            return {"chosen": chosen, "rejected": rejected}
        return {"rewards": rewards}

    def save_pretrained(self, path: str | Path, merged: bool = False) -> Path:
        """Export in Hugging Face format: a peft adapter folder (with the score head), or with
        ``merged`` (or under full fine-tuning) a plain ``transformers`` model. Tokenizer included
        (a VLM's whole processor, and its head as ``reward_head.safetensors``).
        """
        path = Path(path)
        model = self.model
        if merged and self.config.finetune == "lora":
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        (self.processor or self.tokenizer).save_pretrained(path)
        return path
