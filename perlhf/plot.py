"""Plot a quickstart run from its TensorBoard logs: reward-model accuracy, gold vs reward-model
score over RL, and the KL to the reference.

    python -m perlhf.plot --root checkpoints/quickstart --out docs/quickstart.png
"""

from __future__ import annotations

import argparse
import bisect
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PLOTTED = {
    "reward": ("train/accuracy", "val/accuracy"),
    "rl": (
        "train/rollout_step",
        "train/gold_score",
        "train/reward",
        "train/kl",
        "val/gold_score",
        "val/reward",
    ),
}
"""The logged scalars each panel reads (the names the modules log and the README lists)."""


def scalars(run_dir: str | Path, *tags: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` for those of ``tags`` present in the run's event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    present = set(events.Tags()["scalars"])
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in tags
        if tag in present
    }


def plot_run(reward_run: str | Path, rl_run: str | Path, out: str | Path) -> Path:
    """Write a three-panel PNG for one reward-model run and one RL run; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rm = scalars(reward_run, *PLOTTED["reward"])
    rl = scalars(rl_run, *PLOTTED["rl"])
    if "train/rollout_step" not in rl or "train/gold_score" not in rl:
        raise ValueError(
            f"{rl_run} has no train/rollout_step or train/gold_score scalars; is it an RL run "
            "logged with the perlhf.callbacks.GoldScore callback?"
        )
    # Optimiser step -> rollout number, so train and validation points share the x axis.
    known, numbers = rl["train/rollout_step"]

    def rollouts(steps: list[int]) -> list[float]:
        """The rollout number logged at or before each step (the first one before any)."""
        return [numbers[max(bisect.bisect_right(known, s) - 1, 0)] for s in steps]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if "train/accuracy" in rm:
        ax.plot(*rm["train/accuracy"], color="tab:gray", alpha=0.5, label="train batch")
    if "val/accuracy" in rm:
        ax.plot(*rm["val/accuracy"], "o-", color="tab:blue", label="held-out (gold labels)")
    ax.set(title="Reward model: pairwise accuracy", xlabel="optimiser step", ylabel="accuracy")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    steps, gold = rl["train/gold_score"]
    ax.plot(rollouts(steps), gold, color="tab:green", label="gold score (rollouts)")
    if "train/reward" in rl:
        steps, score = rl["train/reward"]
        ax.plot(rollouts(steps), score, color="tab:orange", label="reward-model score (rollouts)")
    if "val/gold_score" in rl:
        steps, value = rl["val/gold_score"]
        ax.plot(rollouts(steps), value, "o--", color="tab:green", label="gold score (held-out prompts)")
    if "val/reward" in rl:
        steps, value = rl["val/reward"]
        ax.plot(rollouts(steps), value, "o--", color="tab:orange", label="RM score (held-out prompts)")
    ax.set(title="RL: gold vs reward-model score", xlabel="rollout", ylabel="mean score per response")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    if "train/kl" in rl:
        steps, kl = rl["train/kl"]
        ax.plot(rollouts(steps), kl, color="tab:red")
    ax.set(title="RL: KL to the reference policy", xlabel="rollout", ylabel="nats per response")
    ax.grid(alpha=0.3)

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latest_version(run: Path) -> Path:
    """``run/version_N`` with the largest N (``run`` itself if it has no versions)."""
    versions = sorted(run.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    return versions[-1] if versions else run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot a quickstart run from its TensorBoard logs.")
    parser.add_argument("--root", default="checkpoints/quickstart", help="the quickstart --root")
    parser.add_argument("--algorithm", default="reinforce", help="which RL run to plot")
    parser.add_argument("--reward-run", help="a reward-model log folder (default: latest under root)")
    parser.add_argument("--rl-run", help="an RL log folder (default: latest under root)")
    parser.add_argument("--out", help="PNG to write (default: <root>/quickstart.png)")
    args = parser.parse_args(argv)
    logs = Path(args.root) / "logs"
    reward_run = args.reward_run or latest_version(logs / "reward")
    rl_run = args.rl_run or latest_version(logs / args.algorithm)
    out = plot_run(reward_run, rl_run, args.out or Path(args.root) / "quickstart.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
