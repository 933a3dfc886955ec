"""Knob groups of ``PPOModule`` and the KL-coefficient controller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PPOSpec:
    """How each rollout batch is turned into parameter updates."""

    epochs: int = 4
    """Passes over each rollout batch (use 1 for REINFORCE and RLOO: on-policy)."""
    minibatch_size: int = 16
    """Sequences per forward/backward pass."""
    gradient_accumulation: int = 1
    """Minibatches accumulated into one optimiser step."""
    cliprange: float = 0.2
    """PPO ratio clip ε (ppo, rloo)."""
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

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
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
    estimator: Literal["k1", "k3"] = "k1"
    """Per-token estimator: k1 = log π − log π_ref; k3 = unbiased, non-negative."""
    penalty: Literal["reward", "loss"] = "reward"
    """``reward``: subtract β·KL from per-token rewards; ``loss``: add β·KL to the loss."""

    def __post_init__(self) -> None:
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


Algorithm = Literal["ppo", "reinforce", "rloo"]
ValueMode = Literal["adapter", "shared", "separate"]
