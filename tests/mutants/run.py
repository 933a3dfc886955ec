"""Apply one-line slips to a copy of perlhf and check that a test catches each.

    python tests/mutants/run.py                 # every mutant
    python tests/mutants/run.py kl-bonus-rloo   # some, by name
    python tests/mutants/run.py --list

Each mutant replaces one exact line fragment in a fresh copy of the repository (``perlhf/``,
``tests/``, ``cli.py``, ``configs/``) and runs the tests named for it there; the mutant is
*killed* when they fail. A fragment that no longer occurs exactly once is reported as stale, so
the list follows the code. Exit status 1 if any mutant survives or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RL, LOSSES, POLICY, CONFIG = (
    "perlhf/modules/rl.py",
    "perlhf/losses.py",
    "perlhf/modules/policy.py",
    "perlhf/modules/rl_config.py",
)
MATH, CORRECT, GRPO = "tests/test_rl_math.py", "tests/test_rl_correctness.py", "tests/test_grpo.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "reinforce-uses-ppo-gamma-lambda",
        RL,
        'gamma, lam = (1.0, 1.0) if self.algorithm == "reinforce" else (self.ppo.gamma, self.ppo.lam)',
        "gamma, lam = self.ppo.gamma, self.ppo.lam",
        (f"{MATH}::test_reinforce_advantages_by_hand",),
    ),
    Mutant(
        "adaptive-kl-sign-inverted",
        CONFIG,
        "error = min(max(kl / self.spec.target - 1.0, -0.2), 0.2)",
        "error = min(max(1.0 - kl / self.spec.target, -0.2), 0.2)",
        (f"{MATH}::test_adaptive_kl_controller_by_hand",),
    ),
    Mutant(
        "no-temperature-in-logprobs",
        POLICY,
        "return logprobs_from_logits(logits, response_ids, temperature), entropy",
        "return logprobs_from_logits(logits, response_ids), entropy",
        (f"{MATH}::test_logprobs_use_the_sampling_temperature",),
    ),
    Mutant(
        "logprob-gradient-sign",
        LOSSES,
        ".mul_(-g[rows])",
        ".mul_(g[rows])",
        ("tests/test_losses.py::test_logprobs_from_logits_chunked_values_and_gradients_match_autograd",),
    ),
    Mutant(
        "logprob-chunk-off-by-one",
        LOSSES,
        "yield slice(start, start + step)",
        "yield slice(start, start + step - 1)",
        ("tests/test_losses.py::test_logprobs_from_logits_chunked_values_and_gradients_match_autograd",),
    ),
    Mutant(
        "no-division-by-accumulation",
        RL,
        "self.manual_backward(loss / accumulation)",
        "self.manual_backward(loss)",
        (f"{MATH}::test_gradient_accumulation_averages_minibatches",),
    ),
    Mutant(
        "no-gradient-clipping",
        RL,
        "        if self.ppo.max_grad_norm is not None:\n            self.clip_gradients(",
        "        if False:\n            self.clip_gradients(",
        (f"{CORRECT}::test_gradients_are_clipped_after_unscaling",),
    ),
    Mutant(
        "whitening-without-mean-shift",
        RL,
        "advantages = losses.masked_whiten(advantages, mask)",
        "advantages = losses.masked_whiten(advantages, mask, shift_mean=False)",
        (f"{MATH}::test_whitened_advantages_have_zero_mean_and_unit_variance",),
    ),
    Mutant(
        "kl-not-masked-after-eos",
        RL,
        "return losses.kl_penalty(logprobs, ref_logprobs, self.kl_spec.estimator) * mask",
        "return losses.kl_penalty(logprobs, ref_logprobs, self.kl_spec.estimator)",
        (
            f"{MATH}::test_kl_per_sequence_counts_tokens_up_to_eos",
            f"{MATH}::test_rloo_advantages_subtract_the_masked_kl_by_hand",
        ),
    ),
    Mutant(
        "kl-bonus-ppo-reinforce",
        RL,
        "rewards = -beta * kl_tokens",
        "rewards = beta * kl_tokens",
        (f"{MATH}::test_reinforce_advantages_by_hand",),
    ),
    Mutant(
        "kl-bonus-rloo",
        RL,
        "seq_rewards = scores - beta * kl_tokens.sum(-1)",
        "seq_rewards = scores + beta * kl_tokens.sum(-1)",
        (f"{MATH}::test_rloo_advantages_subtract_the_masked_kl_by_hand",),
    ),
    Mutant(
        "score-one-past-eos",
        RL,
        "last = (mask.sum(-1).long() - 1).clamp(min=0)",
        "last = mask.sum(-1).long().clamp(max=mask.shape[1] - 1)",
        (f"{MATH}::test_reinforce_advantages_by_hand",),
    ),
    Mutant(
        "kl-loss-without-importance-weight",
        LOSSES,
        "return ratio * kl_penalty(logprobs, ref_logprobs, estimator)",
        "return kl_penalty(logprobs, ref_logprobs, estimator)",
        ("tests/test_losses.py::test_kl_loss_expected_gradient_is_the_kl_gradient",),
    ),
    Mutant(
        "recompute-under-the-current-adapter",
        POLICY,
        "return contextlib.nullcontext(), _adapter_state(layers, state)",
        "return contextlib.nullcontext(), contextlib.nullcontext()",
        (f"{CORRECT}::test_checkpointing_recomputes_under_the_value_adapter",),
    ),
    Mutant(
        "sampling-with-the-checkpoint-generation-config",
        RL,
        "stack.enter_context(clean_generation_config(self.policy))",
        "pass",
        (f"{CORRECT}::test_sampling_ignores_the_checkpoints_generation_config",),
    ),
    Mutant(
        "reinforce-steps-per-minibatch",
        RL,
        'len(self._chunks(n)) if self.algorithm == "reinforce" else self.ppo.gradient_accumulation',
        "self.ppo.gradient_accumulation",
        (f"{CORRECT}::test_reinforce_takes_one_optimiser_step_per_rollout",),
    ),
    Mutant(
        "grpo-advantages-not-centred",
        LOSSES,
        "centred = grouped - grouped.mean(dim=1, keepdim=True)",
        "centred = grouped",
        (f"{GRPO}::test_grpo_advantages_by_hand", "tests/test_losses.py::test_group_advantages_by_hand"),
    ),
    Mutant(
        "grpo-kl-aggregated-as-token-mean",
        RL,
        "loss = loss + self.kl_ctl.value * self._aggregate(kl, m)",
        "loss = loss + self.kl_ctl.value * losses.masked_mean(kl, m)",
        (f"{GRPO}::test_grpo_loss_is_the_aggregated_surrogate_plus_kl",),
    ),
)


def copy_repo(dest: Path) -> None:
    for part in ("perlhf", "tests", "configs"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("cli.py", "pyproject.toml"):
        shutil.copy2(REPO / file, dest / file)


def run(mutant: Mutant) -> str:
    """``killed``, ``SURVIVED`` or ``STALE``."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        target = root / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            return "STALE"
        target.write_text(text.replace(mutant.old, mutant.new))
        env = os.environ | {"PYTHONPATH": str(root)}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        return "killed" if result.returncode == 1 else ("SURVIVED" if result.returncode == 0 else "ERROR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:48} {m.path}  ->  {', '.join(m.tests)}")
        return 0
    bad = 0
    print("| mutant | file | killed by | result |\n|---|---|---|---|")
    for m in chosen:
        outcome = run(m)
        bad += outcome != "killed"
        print(
            f"| {m.name} | {m.path} | {', '.join(t.split('::')[-1] for t in m.tests)} | {outcome} |",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
