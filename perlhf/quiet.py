"""The third-party warnings perlhf silences, each with its reason, in this one place.

Each is about a deliberate choice of perlhf's or a clash between two of its dependencies, never
about the user's data or settings, and appears on every run. ``install()`` runs on ``import
perlhf`` and again when a perlhf module is built (pytest resets filters between tests). The test
suite turns every other warning raised from perlhf's code into an error (``filterwarnings`` in
pyproject.toml). Warnings fixed at their source instead: LoRA on GPT-2's ``Conv1D``
(``fan_in_fan_out`` set by ``perlhf.models``), frozen keys "missing" from
``load_from_checkpoint`` (``TrainableOnlyModule.load_state_dict``), LightningCLI's "args and
command line" (``PerlhfCLI.parse_arguments``), the trainable-parameter count printed twice.
"""

from __future__ import annotations

import warnings

KNOWN: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        Warning,
        "PPOModule trains in eval mode on purpose: without dropout, rollout-time and update-time "
        "log-probs agree (perlhf.modules.rl)",
    ),
    (
        r"Your `IterableDataset` has `__len__` defined",
        Warning,
        "RolloutDataset is sized on purpose (so Lightning never prefetches a rollout: every batch is "
        "sampled from the current weights) and is always loaded with num_workers=0",
    ),
    (
        r"`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "peft's PeftModel reads transformers' deprecated attribute when wrapping any model; nothing "
        "perlhf calls (peft 0.21 with transformers 5)",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        Warning,
        "Lightning's pytree helper uses an API torch 2.13 deprecated; raised on every logged step",
    ),
    (
        r"The dirpath has changed from .* therefore `best_model_score`",
        Warning,
        "a resumed or validated run logs into a new version_N folder by design; the checkpoint's best "
        "model path is still restored, `--ckpt_path last` finds the newest last.ckpt",
    ),
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        Warning,
        "PPOModule checkpoints the state after each update on purpose: weights, optimiser state and "
        "rollout count then describe the start of the next rollout, so resume is exact "
        "(tests/test_resume.py)",
    ),
)
"""``(message regex, category, reason)`` of each silenced warning."""


def install() -> None:
    """Add an ``ignore`` filter for each of ``KNOWN``."""
    for message, category, _reason in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
