"""perlhf LightningModules."""

from perlhf.modules.reward import RewardModule

__all__ = ["RewardModule"]
