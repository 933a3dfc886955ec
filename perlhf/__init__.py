"""perlhf: parameter-efficient RLHF (PE-RLHF) as PyTorch Lightning modules.

The public names, importable from ``perlhf`` itself (loaded on first use, so ``python -m
perlhf.<tool>`` stays quick):

- modules: ``RewardModule``, ``PPOModule``, ``SFTModule`` and their settings ``ModelConfig``,
  ``LoraSpec``, ``PPOSpec``, ``KLSpec``;
- data: ``PreferenceDataModule``, ``RolloutDataModule``, ``SFTDataModule``, and for your own
  rollout source the batch contract ``RolloutBatch`` and ``RolloutDataset``;
- rewards: ``Reward``, ``FunctionReward``, ``RewardFunction``;
- inference: ``RewardModel``, ``Policy``, ``sequence_scores``;
- callbacks and logging: ``ExportPretrained``, ``GoldScore``, ``log_samples``.
"""

from __future__ import annotations

import importlib
from typing import Any

from perlhf import quiet

quiet.install()

_PUBLIC = {
    "RewardModule": "perlhf.modules.reward",
    "PPOModule": "perlhf.modules.rl",
    "SFTModule": "perlhf.modules.sft",
    "ModelConfig": "perlhf.models",
    "LoraSpec": "perlhf.models",
    "PPOSpec": "perlhf.modules.rl_config",
    "KLSpec": "perlhf.modules.rl_config",
    "PreferenceDataModule": "perlhf.data.preference",
    "RolloutDataModule": "perlhf.data.rollout",
    "SFTDataModule": "perlhf.data.sft",
    "RolloutBatch": "perlhf.contracts",
    "RolloutDataset": "perlhf.data.rollout",
    "Reward": "perlhf.rewards",
    "FunctionReward": "perlhf.rewards",
    "RewardFunction": "perlhf.rewards",
    "RewardModel": "perlhf.inference",
    "Policy": "perlhf.inference",
    "sequence_scores": "perlhf.scoring",
    "ExportPretrained": "perlhf.callbacks",
    "GoldScore": "perlhf.callbacks",
    "log_samples": "perlhf.samples",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'perlhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
