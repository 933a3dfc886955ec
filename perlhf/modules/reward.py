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
from perlhf.packing import PackedPairs, pack_pairs
from perlhf.scoring import sequence_scores
from perlhf.vlm import VisionRewardModel

Batch = dict[str, torch.Tensor]
EVAL_STAGES = ("val", "test")


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
        share_prefix: Pairwise text batches: compute each prompt once, as one packed row
            ``prefix | chosen | rejected`` with a block attention mask and restarted positions
            (``perlhf.packing``); pairs of one prompt in a batch share a row in which each
            distinct answer is computed once (``PreferenceDataModule(group_by_prompt=True)``
            batches them together). Rewards, loss and gradients equal the unshared path's.
            Needs ``sdpa`` or ``eager`` attention.
        optimizer: Optimiser over trainable parameters only.
        scheduler: Optional LR scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        model: ModelConfig,
        objective: Literal["pairwise", "classifier"] = "pairwise",
        center_coef: float = 0.0,
        share_prefix: bool = False,
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
        self.share_prefix = share_prefix
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.processor = None  # a VLM backbone's processor (exported with the model)
        # Epoch metrics of the evaluation stages; training logs each batch's values.
        self.metrics = nn.ModuleDict({f"{stage}_": self._make_metrics(stage) for stage in EVAL_STAGES})

    def _make_metrics(self, stage: str) -> nn.ModuleDict:
        if self.objective == "pairwise":
            names = ("accuracy", "chosen_reward", "rejected_reward", "margin")
            return nn.ModuleDict({name: MeanMetric() for name in names})
        return nn.ModuleDict({"accuracy": BinaryAccuracy(), "reward": MeanMetric(), "auroc": BinaryAUROC()})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(
            self.tokenizer_name_or_path, self.config.trust_remote_code, self.config.tokenizer_key
        )
        self.model = build_reward_model(self.config, pad_token_id=self.tokenizer.pad_token_id)
        if isinstance(self.model, VisionRewardModel):
            self.processor = load_processor(self.tokenizer_name_or_path, self.config.trust_remote_code)
        if self.share_prefix:
            self._check_packable()
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision: torch.Tensor
    ) -> torch.Tensor:
        """Scalar rewards ``(N,)`` in float32 for sequences ``(N, L)`` (and a VLM's image inputs),
        padded on either side with any id (``perlhf.scoring.sequence_scores``)."""
        return sequence_scores(self.model, input_ids, attention_mask, **vision)

    def _check_packable(self) -> None:
        if isinstance(self.model, VisionRewardModel):
            raise ValueError(
                "model.share_prefix: not supported for vision-language reward models; set it to false"
            )
        impl = self._sequence_classifier().config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"model.share_prefix needs attention that takes a 4D mask (sdpa or eager), not {impl!r}; "
                "set model.model.attn_implementation: sdpa, or share_prefix: false"
            )

    def _sequence_classifier(self) -> nn.Module:
        """The transformers ``*ForSequenceClassification`` model inside any peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def packed_rewards(self, packed: PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected rewards ``(B,)`` each (float32) from packed pairs: one pass over
        the ``prefix | tail_1 | … | tail_k`` rows, scored at each tail's last token."""
        classifier = self._sequence_classifier()
        body = getattr(classifier, classifier.base_model_prefix)
        eager = classifier.config._attn_implementation == "eager"
        mask = packed.attention_mask(body.dtype if eager else None)
        hidden = body(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids)
        last = hidden.last_hidden_state  # (G, L, H)
        rewards = classifier.score(last[packed.rows, packed.ends]).squeeze(-1).float()  # (2B,)
        chosen, rejected = rewards.chunk(2)
        return chosen, rejected

    def pair_rewards(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected rewards ``(B,)`` of a pairwise batch, packed when ``share_prefix``."""
        packed = self._pack(batch)
        if packed is not None:
            return self.packed_rewards(packed)
        rewards = self(batch["input_ids"], batch["attention_mask"], **batch.get("vision", {}))
        chosen, rejected = rewards.chunk(2)
        return chosen, rejected

    def _pack(self, batch: Batch) -> PackedPairs | None:
        if not self.share_prefix or "vision" in batch:
            return None
        return pack_pairs(
            batch["input_ids"],
            batch["attention_mask"],
            self.tokenizer.pad_token_id,
            batch.get("prompt_lengths"),
        )

    def _batch_rewards(self, batch: Batch, stage: str) -> torch.Tensor:
        """Rewards ``(N,)`` of a batch's rows (pairwise: chosen then rejected), packed when
        ``share_prefix`` (logging the share of tokens computed)."""
        packed = self._pack(batch) if self.objective == "pairwise" else None
        if packed is None:
            if stage == "train":  # real tokens per position computed (``group_by_length`` raises it)
                real = batch["attention_mask"].float().mean()
                self.log("train/real_token_fraction", real, batch_size=batch["input_ids"].shape[0])
            return self(batch["input_ids"], batch["attention_mask"], **batch.get("vision", {}))
        chosen, rejected = self.packed_rewards(packed)
        fraction = packed.tokens / packed.unshared_tokens  # tokens computed per unshared token
        self.log(
            f"{stage}/packed_token_fraction",
            fraction,
            on_step=stage == "train",
            on_epoch=stage != "train",
            batch_size=len(chosen),
        )
        return torch.cat([chosen, rejected])

    def _shared_step(self, batch: Batch, stage: str) -> torch.Tensor:
        """Loss and metrics of one batch: ``train/*`` per step (this batch), ``val/*`` and
        ``test/*`` per epoch (``loss``, ``accuracy``, ``chosen_reward``, ``rejected_reward``,
        ``margin``; classifier: ``loss``, ``accuracy``, ``reward``, ``auroc``)."""
        self._check_batch(batch)
        rewards = self._batch_rewards(batch, stage)
        if self.objective == "pairwise":
            chosen, rejected = rewards.chunk(2)
            loss = pairwise_loss(chosen, rejected, batch.get("margin"), self.center_coef)
            values = {
                "accuracy": (chosen > rejected).float(),
                "chosen_reward": chosen.detach(),
                "rejected_reward": rejected.detach(),
                "margin": (chosen - rejected).detach(),
            }
            updates = {name: (value,) for name, value in values.items()}
        else:
            labels = batch["labels"]
            loss = classifier_loss(rewards, labels)
            probs = torch.sigmoid(rewards.detach())
            values = {"accuracy": ((probs > 0.5) == labels.bool()).float(), "reward": rewards.detach()}
            updates = {
                "accuracy": (probs, labels.long()),
                "reward": (rewards.detach(),),
                "auroc": (probs, labels.long()),
            }
        n = rewards.shape[0]
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            for name, value in values.items():
                self.log(f"train/{name}", value.mean(), prog_bar=name == "accuracy", batch_size=n)
            return loss
        metrics = self.metrics[f"{stage}_"]
        for name, args in updates.items():
            metrics[name].update(*args)
        # The epoch mean over every rank's batches.
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
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
        if self.objective == "pairwise" and "labels" not in batch:
            chosen, rejected = self.pair_rewards(batch)
            return {"chosen": chosen, "rejected": rejected}
        return {"rewards": self(batch["input_ids"], batch["attention_mask"], **batch.get("vision", {}))}

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
