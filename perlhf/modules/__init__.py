"""perlhf LightningModules."""

from perlhf.modules.reward import RewardModule
from perlhf.modules.rl import PPOModule
from perlhf.modules.sft import SFTModule

__all__ = ["PPOModule", "RewardModule", "SFTModule"]
