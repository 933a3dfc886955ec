"""On-policy RL with LoRA: PPO, the paper's REINFORCE with a value baseline, RLOO and GRPO."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import save_file
from torch import nn

from perlhf import losses
from perlhf.contracts import check_rollout_batch, check_rollout_source
from perlhf.data.images import combine_vision, load_processor
from perlhf.guards import check_finite
from perlhf.models import ModelConfig, build_causal_lm, checkpointing_in_eval, load_tokenizer
from perlhf.modules.base import TrainableOnlyModule, check_training_config, default_optimizer
from perlhf.modules.policy import (
    NEUTRAL_SAMPLING,
    POLICY,
    REFERENCE,
    VALUE,
    active_adapter,
    adapters_disabled,
    add_value_adapter,
    clean_generation_config,
    frozen_causal_lm,
    hf_model,
    merged_lora,
    packed_response_hidden,
    recompute_under_forward_adapters,
    response_hidden,
    start_from_adapter,
    token_logprobs,
    value_backbone,
)
from perlhf.modules.rl_config import Algorithm, KLController, KLSpec, PPOSpec, ValueMode
from perlhf.packing import pack_groups
from perlhf.samples import log_samples
from perlhf.strategies import gathered_params, is_sharded
from perlhf.utils import peak_memory_mb
from perlhf.vlm import is_vision_language

Batch = dict[str, Any]


class PPOModule(TrainableOnlyModule):
    """The RL half of PE-RLHF, driven by rollouts from ``RolloutDataModule``.

    Each training step receives one rollout batch (prompts, sampled responses, frozen reward-model
    scores), computes log-probs, reference log-probs and values, turns scores and the KL penalty
    into advantages, and runs ``ppo.epochs`` passes of minibatch updates (manual optimisation).

    Algorithms: ``ppo`` (clipped surrogate, GAE, clipped value loss), ``reinforce`` (REINFORCE
    with a learned value baseline, sequence reward at the last token, γ = 1 — the paper's choice),
    ``rloo`` (leave-one-out baseline over ``samples_per_prompt`` samples, no critic), ``grpo``
    (group-normalised advantages, clipped ratio, KL in the loss, ``ppo.loss_aggregation``).

    Args:
        model: Policy backbone and fine-tuning mode. Under LoRA the policy is adapter ``policy``.
        algorithm: ``reinforce`` (the paper's; one optimiser step per rollout), ``ppo``, ``rloo``
            or ``grpo``.
        ppo: Update settings (epochs, minibatches, clipping, GAE); ``epochs`` defaults to the
            algorithm's own (1 for reinforce, 4 otherwise).
        kl: KL-to-reference coefficient, controller, estimator and where the penalty enters.
        value: Critic: ``adapter`` (a ``value`` LoRA adapter on the policy backbone, LoRA only),
            ``shared`` (value head on the policy trunk), ``separate`` (its own backbone).
        value_model: Backbone of a ``separate`` critic; None: the policy's.
        reference_model: A separate frozen reference policy (e.g. the merged SFT model your policy
            starts from). None: the backbone with adapters disabled (LoRA) or a frozen copy (full).
        policy_adapter: A trained LoRA adapter folder (e.g. an SFT export, not merged) the policy
            starts from; a frozen copy of it is the reference. LoRA only, same rank and targets.
        optimizer: Optimiser over trainable parameters only.
        scheduler: Optional LR scheduler, stepped every optimiser step.
        log_samples_every: Log a text table of prompts, responses and rewards every N rollouts.
        merge_for_generation: Sample with each LoRA update folded into a temporary copy of its base
            weight (exact; the frozen weights come back bit-identical), so decoding runs one matmul
            per layer instead of three. Skipped for DoRA, quantised and sharded (FSDP, ZeRO-3) models.
        share_prompt: Compute each prompt once for all its sampled responses in the scoring and
            update passes: one packed row ``prompt | response_1 | … | response_k`` per prompt with a
            block-causal mask (``perlhf.packing.pack_groups``; exact up to float rounding), which
            also drops padding. None: on where the backbone takes 4D masks (``sdpa``, ``eager``)
            and prompts are text.
        max_rollouts: Stop training after this many rollouts (the RL run's length; the Trainer's
            ``max_steps`` counts optimiser steps, several per rollout for ppo, rloo and grpo).
            None: the Trainer's limits, ``max_epochs`` × ``data.rollouts_per_epoch`` rollouts.
    """

    def __init__(
        self,
        model: ModelConfig,
        algorithm: Algorithm = "reinforce",
        ppo: PPOSpec | None = None,
        kl: KLSpec | None = None,
        value: ValueMode | None = None,
        value_model: str | None = None,
        reference_model: str | None = None,
        policy_adapter: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        log_samples_every: int = 10,
        max_rollouts: int | None = None,
        merge_for_generation: bool = True,
        share_prompt: bool | None = None,
    ) -> None:
        super().__init__()
        model = ModelConfig.coerce(model)
        check_training_config(model, optimizer)
        ppo = ppo if isinstance(ppo, PPOSpec) else PPOSpec(**(ppo or {}))
        kl = kl if isinstance(kl, KLSpec) else KLSpec(**(kl or {}))
        if algorithm not in ("ppo", "reinforce", "rloo", "grpo"):
            raise ValueError(f"algorithm must be 'ppo', 'reinforce', 'rloo' or 'grpo', got {algorithm!r}")
        if algorithm == "grpo" and kl.penalty != "loss":
            raise ValueError("algorithm 'grpo' puts the KL term in the loss: set kl.penalty: loss")
        if value is None:
            value = "adapter" if model.finetune == "lora" else "separate"
        if value == "adapter" and model.finetune != "lora":
            raise ValueError("value='adapter' needs model.finetune='lora'; use value: separate or shared")
        if algorithm == "reinforce" and ppo.epochs not in (None, 1):
            raise ValueError(
                f"algorithm 'reinforce' has no importance ratio, so it must stay on-policy: ppo.epochs "
                f"must be 1 (or unset), got {ppo.epochs} (use 'ppo' or 'rloo' for several epochs per rollout)"
            )
        self.save_plain_hyperparameters()
        self.automatic_optimization = False
        self.config, self.algorithm, self.kl_spec = model, algorithm, kl
        self.ppo = ppo.for_algorithm(algorithm)
        self.value_mode: ValueMode | None = None if algorithm in ("rloo", "grpo") else value
        if policy_adapter and (model.finetune != "lora" or reference_model):
            raise ValueError(
                "policy_adapter needs model.finetune: lora and no reference_model (it is the reference)"
            )
        self.value_model, self.reference_model = value_model, reference_model
        self.policy_adapter = policy_adapter
        self.optimizer, self.scheduler = optimizer, scheduler
        self.log_samples_every = log_samples_every
        if max_rollouts is not None and max_rollouts < 1:
            raise ValueError(f"max_rollouts must be >= 1 or null, got {max_rollouts}")
        self.max_rollouts = max_rollouts
        self.merge_for_generation = merge_for_generation
        self.share_prompt = share_prompt
        self._packing = False
        self.kl_ctl = KLController(kl)
        self.rollout_step = 0
        self.sampling_temperature = 1.0
        self.value_initialized = False
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self.tokenizer = None
        self.processor = None  # a VLM policy's processor

    # ----------------------------------------------------------------------------- networks
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(
            self.tokenizer_name_or_path, self.config.trust_remote_code, self.config.tokenizer_key
        )
        self.policy = build_causal_lm(self.config, adapter_name=POLICY)
        if is_vision_language(hf_model(self.policy).config):  # exported with the policy
            self.processor = load_processor(self.tokenizer_name_or_path, self.config.trust_remote_code)
        if self.policy_adapter:
            start_from_adapter(self.policy, self.policy_adapter)
        if self.reference_model or not self.is_lora:
            self.reference = frozen_causal_lm(self.config, self.reference_model or self.config.name_or_path)
        self._packing = self._packable()
        if self.value_mode == "adapter":
            add_value_adapter(self.policy, self.config)
        elif self.value_mode == "separate":
            self.critic = value_backbone(self.config, self.value_model)
        if self.is_lora and self.config.gradient_checkpointing:
            recompute_under_forward_adapters(self.policy)
        if self.value_mode is not None:
            hidden = hf_model(self.critic or self.policy).config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # Dropout would make rollout-time and update-time log-probs disagree: RL runs in eval mode.
        self.eval()

    def _packable(self) -> bool:
        config = hf_model(self.policy).config
        impl = config._attn_implementation
        ok = impl in ("sdpa", "eager") and not is_vision_language(config)
        if self.share_prompt and not ok:
            raise ValueError(
                f"model.share_prompt needs a text backbone whose attention takes a 4D mask (sdpa or eager), "
                f"not {impl!r}; set model.model.attn_implementation: sdpa, or share_prompt: false"
            )
        return ok if self.share_prompt is None else self.share_prompt

    def _hidden(self, model: nn.Module, batch: Batch, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(n, R, H)`` of ``model`` that predict rows ``idx``'s response tokens,
        each prompt computed once for its responses when packing (``share_prompt``)."""
        if self._packing:
            packed = pack_groups(
                batch["prompt_ids"][idx],
                batch["prompt_mask"][idx],
                batch["response_ids"][idx],
                batch["response_mask"][idx],
                self.tokenizer.pad_token_id,
            )
            return packed_response_hidden(model, packed)
        input_ids, attention_mask, prompt_len = _sequences(batch, idx)
        return response_hidden(model, input_ids, attention_mask, prompt_len, **_vision(batch, idx))

    def _policy_ctx(self) -> Any:
        return active_adapter(self.policy, POLICY) if self.is_lora else contextlib.nullcontext()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Sample responses ``(N, R)`` for left-padded prompts ``(N, P)`` with the policy, from
        ``kwargs`` alone (never the checkpoint's ``generation_config``)."""
        kwargs = NEUTRAL_SAMPLING | kwargs
        self.sampling_temperature = float(kwargs["temperature"])
        was_training = self.policy.training
        self.policy.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(gathered_params(self._trainer))
            stack.enter_context(self._policy_ctx())
            if self.merge_for_generation and self.is_lora and not is_sharded(self._trainer):
                stack.enter_context(merged_lora(self.policy))
            stack.enter_context(clean_generation_config(self.policy))
            out = self.policy.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, **kwargs
            )
        self.policy.train(was_training)
        return out[:, prompt_ids.shape[1] :]

    def _forward(
        self, batch: Batch, idx: torch.Tensor, with_values: bool, with_entropy: bool = False
    ) -> dict:
        """Policy log-probs ``(n, R)`` (+ entropy) and values ``(n, R)`` for rows ``idx``."""
        response_ids = batch["response_ids"][idx]
        with self._policy_ctx():
            hidden = self._hidden(self.policy, batch, idx)
        logprobs, entropy = token_logprobs(
            self.policy, hidden, response_ids, self.sampling_temperature, with_entropy
        )
        out = {"logprobs": logprobs, "entropy": entropy}
        if with_values and self.value_mode is not None:
            out["values"] = self._values(batch, idx, hidden if self.value_mode == "shared" else None)
        return out

    def _values(self, batch: Batch, idx: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Critic values ``(n, R)`` for rows ``idx``; ``hidden``: the policy's, for ``shared``."""
        if hidden is None:
            if self.value_mode == "adapter":
                with active_adapter(self.policy, VALUE):
                    hidden = self._hidden(self.policy, batch, idx)
            else:
                hidden = self._hidden(self.critic, batch, idx)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch, idx: torch.Tensor) -> torch.Tensor:
        """Reference-policy log-probs ``(n, R)``: adapters disabled, or the separate reference."""
        if self.reference is not None:
            model, ctx = self.reference, contextlib.nullcontext()
        elif self.policy_adapter:
            model, ctx = self.policy, active_adapter(self.policy, REFERENCE)
        else:
            model, ctx = self.policy, adapters_disabled(self.policy)
        with ctx:
            hidden = self._hidden(model, batch, idx)
            return token_logprobs(model, hidden, batch["response_ids"][idx], self.sampling_temperature)[0]

    # ----------------------------------------------------------------------------- RL step
    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self.eval()
        group = 2 if self.algorithm in ("rloo", "grpo") else 1
        batch = check_rollout_batch(batch, self.tokenizer, min_samples_per_prompt=group)
        self._check_finite("reward-model scores", batch["scores"])
        self.initialize_value_head(batch["scores"])
        n = batch["response_ids"].shape[0]
        mask = batch["response_mask"].float()
        # β fixed at 0: no KL anywhere, so no reference pass.
        with_reference = self.kl_spec.coef != 0 or self.kl_spec.adaptive
        # On-policy shortcut: the update's own (detached) log-probs stand in for the rollout's.
        reuse = self._reuses_update_logprobs(n)
        old, ref = [], []
        with torch.no_grad():
            for idx in self._chunks(n):
                if not reuse:
                    old.append(self._forward(batch, idx, with_values=True))
                if with_reference:
                    ref.append(self.reference_logprobs(batch, idx))
        old_logprobs = None if reuse else torch.cat([o["logprobs"] for o in old])
        ref_logprobs = torch.cat(ref) if with_reference else None
        old_values = torch.cat([o["values"] for o in old]) if self.value_mode else None
        if ref_logprobs is not None:
            self._check_finite("reference log-probs", ref_logprobs)
        kl_tokens = self._kl_tokens(old_logprobs, ref_logprobs, mask)

        advantages, returns = self._advantages(batch, mask, kl_tokens, old_values)
        if reuse:
            old_logprobs = torch.zeros_like(mask)  # filled by the update, minibatch by minibatch
        stats = self._update(
            batch, mask, old_logprobs, ref_logprobs, old_values, advantages, returns, fill_old=reuse
        )
        if reuse:
            kl_tokens = self._kl_tokens(old_logprobs, ref_logprobs, mask)

        kl_per_seq = None
        if ref_logprobs is not None:
            kl = kl_tokens.sum(-1).mean()
            # Every rank adapts β from the KL over all ranks' samples, so β stays identical everywhere.
            world = self.trainer.world_size if self._trainer is not None else 1
            if world > 1:
                kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
            kl_per_seq = kl.item()
            self.kl_ctl.update(kl_per_seq, n * world)
        self.rollout_step += 1
        self._log_rollout(batch, mask, kl_per_seq, stats, old_values, returns)
        self._stop_at_max_rollouts()

    def _kl_tokens(
        self, logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token KL estimates ``(N, R)`` of the rollout policy against the reference (zeros
        without either), masked after EOS."""
        if logprobs is None or ref_logprobs is None:
            return torch.zeros_like(mask)
        self._check_finite("rollout log-probs", logprobs)
        return losses.kl_penalty(logprobs, ref_logprobs, self.kl_spec.estimator) * mask

    def _reuses_update_logprobs(self, n: int) -> bool:
        """Whether the rollout's no-grad policy pass can be skipped, its log-probs taken from the
        update's forward pass instead (detached). Exact when nothing before the update needs them
        (no critic; advantages from the scores alone: grpo, or no β·KL in the reward) and the
        update is one epoch whose minibatches all make one optimiser step: every minibatch then
        sees the rollout policy itself (ratio 1, as the no-grad pass would give). TRL's GRPO does
        the same with one generation per step."""
        if self.value_mode is not None or self.ppo.epochs != 1:
            return False
        kl_in_reward = self.kl_spec.penalty == "reward" and (self.kl_spec.coef != 0 or self.kl_spec.adaptive)
        if self.algorithm != "grpo" and kl_in_reward:
            return False
        chunks = len(self._chunks(n))
        accumulation = chunks if self.algorithm == "reinforce" else self.ppo.gradient_accumulation
        return accumulation >= chunks

    def on_train_start(self) -> None:
        super().on_train_start()
        check_rollout_source(self.trainer.train_dataloader)  # sized, sampled when reached
        self._stop_at_max_rollouts()  # a resumed run may already be there

    def _stop_at_max_rollouts(self) -> None:
        if self.max_rollouts is not None and self.rollout_step >= self.max_rollouts:
            self.trainer.should_stop = True

    @torch.no_grad()
    def initialize_value_head(self, scores: torch.Tensor) -> None:
        """Start the critic at the reward scale: on the first rollout, set the value head's bias to
        the mean score ``(N,)`` (with γ = 1 every token's return starts near it). From 0, value
        clipping (±``cliprange_value`` per rollout) would make the critic crawl to scores of a few
        units. Later calls (and a resumed run) leave the head alone."""
        if self.value_head is None or self.value_initialized:
            return
        mean = scores.float().mean()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            mean = self.trainer.strategy.reduce(mean.to(self.device), reduce_op="mean")
        self.value_head.bias.fill_(mean.item())
        self.value_initialized = True

    def _advantages(
        self, batch: Batch, mask: torch.Tensor, kl_tokens: torch.Tensor, values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token advantages ``(N, R)`` and value targets (None for rloo and grpo)."""
        beta = self.kl_ctl.value if self.kl_spec.penalty == "reward" else 0.0
        scores = batch["scores"].float()
        if self.algorithm == "grpo":
            scale = self.ppo.loss_aggregation != "dr_grpo"  # Dr. GRPO drops the std division
            advantages = losses.group_advantages(scores, batch["samples_per_prompt"], scale)[:, None] * mask
            self._check_finite("advantages", advantages)
            return advantages, None
        if self.algorithm == "rloo":
            k = batch["samples_per_prompt"]
            seq_rewards = scores - beta * kl_tokens.sum(-1)
            advantages = losses.rloo_advantages(seq_rewards, k)[:, None] * mask
            returns = None
        else:
            rewards = -beta * kl_tokens
            last = (mask.sum(-1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += scores
            gamma, lam = (1.0, 1.0) if self.algorithm == "reinforce" else (self.ppo.gamma, self.ppo.lam)
            advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
        if self.ppo.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
        self._check_finite("advantages", advantages)
        return advantages, returns

    def _update(
        self,
        batch: Batch,
        mask,
        old_logprobs,
        ref_logprobs,
        old_values,
        advantages,
        returns,
        fill_old: bool = False,
    ) -> dict:
        """Backward passes and optimiser steps over the rollout; with ``fill_old``
        (``_reuses_update_logprobs``), each minibatch's detached log-probs are written into
        ``old_logprobs`` before use."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n = mask.shape[0]
        sums: dict[str, float] = {}
        count = 0
        accumulated = 0
        # REINFORCE has no importance ratio: all of a rollout's minibatches make one step.
        accumulation = (
            len(self._chunks(n)) if self.algorithm == "reinforce" else self.ppo.gradient_accumulation
        )
        # The module trains in eval mode (no dropout); keep gradient checkpointing active anyway.
        with checkpointing_in_eval(self):
            for epoch in range(self.ppo.epochs):
                order = self._update_order(n, int(batch.get("samples_per_prompt", 1)), mask.device)
                for idx in self._chunks(n, order):
                    for loss, step_stats in self._minibatch_losses(
                        batch,
                        idx,
                        epoch,
                        mask,
                        old_logprobs,
                        ref_logprobs,
                        old_values,
                        advantages,
                        returns,
                        fill_old,
                    ):
                        self._check_finite("loss", loss)
                        self.manual_backward(loss / accumulation)
                        for key, value in step_stats.items():
                            sums[key] = sums.get(key, 0.0) + float(value)
                    accumulated += 1
                    if accumulated == accumulation:
                        self._optimizer_step(optimizer, scheduler)
                        accumulated = 0
                    count += 1
        if accumulated:
            self._optimizer_step(optimizer, scheduler)
        stats = {k: v / count for k, v in sums.items()}
        stats["entropy"] = sums.get("entropy", 0.0) / max(1, -(-n // self.ppo.minibatch_size))
        return stats

    def _split_backward(self) -> bool:
        """Backpropagate the policy loss before the critic's forward pass, so the two graphs'
        activations never coexist (about half the update's activation memory). Needs a critic
        with its own forward (``adapter`` or ``separate``) and one process: DDP expects every
        trainable parameter to receive its gradient in each backward pass."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.value_mode in ("adapter", "separate") and world == 1

    def _minibatch_losses(
        self,
        batch: Batch,
        idx,
        epoch: int,
        mask,
        old_logprobs,
        ref_logprobs,
        old_values,
        advantages,
        returns,
        fill_old: bool = False,
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Losses of rows ``idx`` to backpropagate in turn, each with its parts for logging.

        One loss (policy + value + optional KL term), or, with ``_split_backward``, the policy
        loss and then the value loss: the generator computes the critic's forward only after
        the caller has run the policy loss's backward. The gradients are the same either way.
        """
        split = self._split_backward()
        out = self._forward(batch, idx, with_values=not split, with_entropy=epoch == 0)
        if fill_old:
            old_logprobs[idx] = out["logprobs"].detach()
        m = mask[idx]
        if self.algorithm == "reinforce":
            pg_loss = losses.reinforce_policy_loss(out["logprobs"], advantages[idx], m)
            clipfrac = approx_kl = torch.zeros((), device=m.device)
        elif self.algorithm == "grpo":
            pg_loss, clipfrac, approx_kl = self._grpo_policy_loss(
                out["logprobs"], old_logprobs[idx], advantages[idx], m
            )
        else:
            pg_loss, clipfrac, approx_kl = losses.ppo_policy_loss(
                out["logprobs"], old_logprobs[idx], advantages[idx], m, self.ppo.cliprange
            )
        loss, step_stats = (
            pg_loss,
            {"policy_loss": pg_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl},
        )
        if self.kl_spec.penalty == "loss" and ref_logprobs is not None:
            kl = losses.kl_loss(out["logprobs"], old_logprobs[idx], ref_logprobs[idx], self.kl_spec.estimator)
            loss = loss + self.kl_ctl.value * self._aggregate(kl, m)
        if out["entropy"] is not None:
            step_stats["entropy"] = losses.masked_mean(out["entropy"], m)
        if self.value_mode is None:
            yield loss, step_stats
            return
        if split:
            yield loss, step_stats
            # The policy graph was freed by its backward pass; only now run the critic.
            del out, loss
            values, loss, step_stats = self._values(batch, idx), 0.0, {}
        else:
            values = out["values"]
        cliprange_value = None if self.algorithm == "reinforce" else self.ppo.cliprange_value
        vf_loss, vf_clipfrac = losses.value_loss(values, old_values[idx], returns[idx], m, cliprange_value)
        step_stats |= {"value_loss": vf_loss.detach(), "value_clipfrac": vf_clipfrac}
        yield loss + self.ppo.vf_coef * vf_loss, step_stats

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar of a per-token loss ``(n, R)``: ``ppo.loss_aggregation`` for grpo, else the
        token mean."""
        aggregation = self.ppo.loss_aggregation if self.algorithm == "grpo" else "dapo"
        return losses.aggregate(per_token, mask, aggregation)

    def _grpo_policy_loss(
        self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clipped surrogate ``(n, R)`` reduced by ``ppo.loss_aggregation``; clipfrac, approx KL."""
        per_token, clipped = losses.clipped_surrogate(logprobs, old_logprobs, advantages, self.ppo.cliprange)
        approx_kl = losses.masked_mean(0.5 * (logprobs - old_logprobs).pow(2), mask)
        clipfrac = losses.masked_mean(clipped.float(), mask)
        return self._aggregate(per_token, mask), clipfrac.detach(), approx_kl.detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip here: the precision plugin calls this after unscaling fp16 gradients (clipping
        before ``optimizer.step()`` would clip the loss-scaled ones, Lightning #18089)."""
        if self.ppo.max_grad_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm"
            )

    def _optimizer_step(self, optimizer: Any, scheduler: Any) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def _update_order(self, n: int, samples_per_prompt: int, device: torch.device) -> torch.Tensor:
        """A random order ``(n,)`` of a rollout's rows for the update's minibatches. Packing
        prompts (``share_prompt``) with k = ``samples_per_prompt`` > 1, whole groups are shuffled
        (rows ``p*k … p*k+k-1`` stay together, in a prompt-major rollout), so a minibatch computes
        each of its prompts once for all k samples and its packed rows are equally long."""
        k = samples_per_prompt
        if not self._packing or k < 2 or n % k:
            return torch.randperm(n, device=device)
        groups = torch.randperm(n // k, device=device)
        return (groups[:, None] * k + torch.arange(k, device=device)).flatten()

    def _chunks(self, n: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
        order = torch.arange(n, device=self.device) if order is None else order
        return list(order.split(self.ppo.minibatch_size))

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        batch = check_rollout_batch(batch, self.tokenizer)
        n = batch["response_ids"].shape[0]
        mask = batch["response_mask"].float()
        idx = torch.arange(n, device=self.device)
        logprobs = self._forward(batch, idx, with_values=False)["logprobs"]
        kl = (
            losses.kl_penalty(logprobs, self.reference_logprobs(batch, idx), self.kl_spec.estimator) * mask
        ).sum(-1)
        metrics = {
            "val/reward": batch["raw_scores"].float().mean(),
            "val/kl": kl.mean(),
            "val/response_length": mask.sum(-1).mean(),
            "val/eos_fraction": batch["ended_with_eos"].float().mean(),
        }
        reward = metrics.pop("val/reward")
        self.log_dict(metrics, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/reward", reward, on_epoch=True, batch_size=n, prog_bar=True, sync_dist=True)

    # ----------------------------------------------------------------------------- logging, guard
    def _log_rollout(
        self, batch: Batch, mask, kl_per_seq: float | None, stats: dict, values, returns
    ) -> None:
        n_tokens = mask.sum().item()
        logs = {f"train/{k}": v for k, v in stats.items()}
        logs |= {f"train/{k}": float(v) for k, v in batch.get("stats", {}).items()}
        logs |= {
            # The reward as the rewards gave it (val/reward's definition); what the update saw
            # after penalties, normalisation and clipping is train/reward/shaped_mean.
            "train/reward_std": batch["raw_scores"].float().std().item(),
            "train/kl_coef": self.kl_ctl.value,
            "train/response_length": mask.sum(-1).mean().item(),
            "train/eos_fraction": batch["ended_with_eos"].float().mean().item(),
            # Per phase (update here, generation below); ThroughputMonitor times the whole loop.
            "train/update_tokens_per_s": n_tokens
            * self.ppo.epochs
            / max(time.perf_counter() - self._t0, 1e-9),
            "train/peak_memory_mb": peak_memory_mb(self.device),
            "train/rollout_step": float(self.rollout_step),
        }
        generate_s = batch.get("stats", {}).get("rollout/generate_s")
        if generate_s:
            logs["train/generate_tokens_per_s"] = n_tokens / generate_s
        if kl_per_seq is not None:
            logs["train/kl"] = kl_per_seq
        if values is not None:
            residual = losses.masked_var(returns - values, mask, unbiased=False)
            logs["train/explained_variance"] = (
                1 - residual / losses.masked_var(returns, mask, unbiased=False)
            ).item()
        self.log_dict(logs, on_step=True, batch_size=mask.shape[0])
        reward = batch["raw_scores"].float().mean().item()
        self.log("train/reward", reward, prog_bar=True, on_step=True, batch_size=mask.shape[0])
        if (
            self.log_samples_every
            and self.rollout_step % self.log_samples_every == 1 % self.log_samples_every
        ):
            self._log_samples(batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def _log_samples(self, batch: Batch, limit: int = 8) -> None:
        rows = list(zip(batch["prompts"], batch["responses"], batch["scores"].tolist(), strict=True))
        log_samples(
            self.loggers, "train/samples", ["prompt", "response", "reward"], rows[:limit], self.rollout_step
        )

    def _check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Stop unless ``tensor`` is finite on every rank (``perlhf.guards``); the last good state
        is saved as ``nan-guard/rollout-<n>.ckpt`` and all ranks stop together."""
        where = f"rollout step {self.rollout_step} (optimiser step {self.global_step})"
        check_finite(self, name, tensor, where=where, save_as=f"rollout-{self.rollout_step}.ckpt")

    # ----------------------------------------------------------------------------- state, export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rl_state"] = {
            "kl_coef": self.kl_ctl.value,
            "rollout_step": self.rollout_step,
            "sampling_temperature": self.sampling_temperature,
            "value_initialized": self.value_initialized,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rl_state", {})
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)
        self.rollout_step = state.get("rollout_step", 0)
        self.sampling_temperature = state.get("sampling_temperature", 1.0)
        # A checkpoint from before this flag holds a trained head: never re-initialise it.
        self.value_initialized = state.get("value_initialized", "rl_state" in checkpoint)

    def save_pretrained(self, path: str | Path, merged: bool = False) -> Path:
        """Export the policy: a peft adapter folder (``<path>/policy``), or with ``merged`` (or
        under full fine-tuning) a plain ``transformers`` model; plus the value head (and value
        adapter) when there is a critic. Tokenizer (a VLM's whole processor) included.
        """
        path = Path(path)
        if not self.is_lora:
            self.policy.save_pretrained(path)
        elif merged:
            policy = copy.deepcopy(self.policy)
            for name in (VALUE, REFERENCE):
                if name in policy.peft_config:
                    policy.delete_adapter(name)
            policy.set_adapter(POLICY)
            policy.merge_and_unload().save_pretrained(path)
        else:
            adapters = [POLICY] + ([VALUE] if self.value_mode == "adapter" else [])
            self.policy.save_pretrained(path, selected_adapters=adapters)
        if self.value_head is not None:
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                path / "value_head.safetensors",
            )
        (self.processor or self.tokenizer).save_pretrained(path)
        return path


def _vision(batch: Batch, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image inputs of rows ``idx`` of an image-prompt rollout (``{}`` for text prompts)."""
    if "prompt_vision" not in batch:
        return {}
    return combine_vision([batch["prompt_vision"][i] for i in idx.tolist()])


def _sequences(batch: Batch, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompt + response ids and mask for rows ``idx``: ``(n, P+R)`` twice, and ``P``."""
    prompt_ids, response_ids = batch["prompt_ids"][idx], batch["response_ids"][idx]
    attention_mask = torch.cat([batch["prompt_mask"][idx], batch["response_mask"][idx]], dim=1)
    return torch.cat([prompt_ids, response_ids], dim=1), attention_mask, prompt_ids.shape[1]
