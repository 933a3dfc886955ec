"""perlhf DataModules and the built-in synthetic task."""

from perlhf.data.preference import PreferenceDataModule

__all__ = ["PreferenceDataModule"]
