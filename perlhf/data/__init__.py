"""perlhf DataModules and the built-in synthetic task."""

from perlhf.data.preference import PreferenceDataModule
from perlhf.data.rollout import RolloutDataModule

__all__ = ["PreferenceDataModule", "RolloutDataModule"]
