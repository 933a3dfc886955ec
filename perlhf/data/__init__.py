"""perlhf DataModules and the built-in synthetic task."""

from perlhf.data.preference import PreferenceDataModule
from perlhf.data.rollout import RolloutDataModule
from perlhf.data.sft import SFTDataModule

__all__ = ["PreferenceDataModule", "RolloutDataModule", "SFTDataModule"]
