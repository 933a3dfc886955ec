"""perlhf LightningModules."""

from perlhf.modules.reward import RewardModule
from perlhf.modules.rl import PPOModule

__all__ = ["PPOModule", "RewardModule"]
