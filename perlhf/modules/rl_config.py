"""Knob groups of ``PPOModule`` and the KL-coefficient controller."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass
class PPOSpec:
    """How each rollout batch is turned into parameter updates."""

    epochs: int | None = None
    """Passes over each rollout batch (GRPO's iterations μ). None: the algorithm's own, 1 for
    ``reinforce`` (no importance ratio, so it must stay on-policy; all minibatches of a rollout
    make one optimiser step) and 4 for ``ppo``, ``rloo`` and ``grpo``."""
    minibatch_size: int = 16
    """Sequences per forward/backward pass."""
    gradient_accumulation: int = 1
    """Minibatches accumulated into one optimiser step (reinforce: always a whole rollout's)."""
    cliprange: float = 0.2
    """Ratio clip ε (ppo, rloo, grpo)."""
    cliprange_value: float | None = 0.2
    """Value clip around the rollout-time values; None disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount (ppo). REINFORCE uses γ = 1 by definition."""
    lam: float = 0.95
    """GAE λ (ppo)."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout batch (masked)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of trainable parameters; None disables."""
    loss_aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How grpo reduces per-token losses: ``grpo`` mean per sequence then over sequences,
    ``dr_grpo`` sum over tokens / (sequences · response width) and no std in the advantages,
    ``dapo`` mean over all tokens (``losses.aggregate``)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatch_size", "gradient_accumulation"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_aggregation not in ("grpo", "dr_grpo", "dapo"):
            raise ValueError(
                f"ppo.loss_aggregation must be 'grpo', 'dr_grpo' or 'dapo', got {self.loss_aggregation!r}"
            )
        checks = {
            "cliprange": (self.cliprange > 0, "> 0"),
            "cliprange_value": (self.cliprange_value is None or self.cliprange_value > 0, "> 0 or null"),
            "vf_coef": (self.vf_coef >= 0, ">= 0"),
            "gamma": (0 <= self.gamma <= 1, "in [0, 1]"),
            "lam": (0 <= self.lam <= 1, "in [0, 1]"),
            "max_grad_norm": (self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or null"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"ppo.{name} must be {allowed}, got {getattr(self, name)}")

    def for_algorithm(self, algorithm: str) -> PPOSpec:
        """These settings with ``epochs`` resolved for ``algorithm`` (see ``epochs``)."""
        if self.epochs is not None:
            return self
        return replace(self, epochs=1 if algorithm == "reinforce" else DEFAULT_EPOCHS)


DEFAULT_EPOCHS = 4
"""Update epochs per rollout of the ratio-clipped algorithms (ppo, rloo, grpo)."""


@dataclass
class KLSpec:
    """Keeping the policy near the reference: β·KL(π_θ ‖ π_ref)."""

    coef: float = 0.05
    """Initial (or fixed) β."""
    adaptive: bool = False
    """Adapt β towards ``target`` KL per sequence (Ziegler et al., 2019)."""
    target: float = 6.0
    """Target KL (nats per sequence) for the adaptive controller."""
    horizon: int = 10000
    """Controller horizon in samples."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator: k1 = log π − log π_ref; k2 = ½ (log π − log π_ref)²; k3 = π_ref/π − 1 −
    log(π_ref/π). In the reward only k1 gives the gradient of KL(π‖π_ref); in the loss each is
    importance-weighted so its expected gradient is that one (``losses.kl_loss``)."""
    penalty: Literal["reward", "loss"] = "reward"
    """``reward``: subtract β·KL from per-token rewards; ``loss``: add β·KL to the loss."""

    def __post_init__(self) -> None:
        if self.estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl.estimator must be 'k1', 'k2' or 'k3', got {self.estimator!r}")
        if self.penalty not in ("reward", "loss"):
            raise ValueError(f"kl.penalty must be 'reward' or 'loss', got {self.penalty!r}")
        if self.penalty == "reward" and self.estimator != "k1":
            raise ValueError(
                f"kl.estimator={self.estimator!r} as a reward penalty does not give the gradient of "
                "KL(π‖π_ref) (the policy gradient drops E[∇k], which is 0 only for k1); use "
                "estimator: k1 with penalty: reward, or penalty: loss"
            )
        checks = {
            "coef": (self.coef >= 0, ">= 0"),
            "target": (self.target > 0, "> 0"),
            "horizon": (self.horizon >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"kl.{name} must be {allowed}, got {getattr(self, name)}")


class KLController:
    """β, fixed or adaptive: ``β ← β · (1 + clip(KL/target − 1, ±0.2) · n / horizon)``."""

    def __init__(self, spec: KLSpec) -> None:
        self.spec = spec
        self.value = spec.coef

    def update(self, kl: float, n_samples: int) -> None:
        if not self.spec.adaptive:
            return
        error = min(max(kl / self.spec.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.spec.horizon


Algorithm = Literal["ppo", "reinforce", "rloo", "grpo"]
ValueMode = Literal["adapter", "shared", "separate"]
