"""LoRA vs full fine-tuning on the real model (SmolLM2-135M-Instruct, sentiment task, VADER judge).

    python benchmarks/parity_real.py                               # every setting, LR grid, seed 0
    python benchmarks/parity_real.py --settings lora-attn-r8 full --stages reward

The paper's central claim, on a real pretrained model: for each setting — full fine-tuning, LoRA
on the attention projections (the paper's placement) at ranks 1, 8 and 32, and LoRA on every
linear layer ("all-linear", rank 8) — the reward model and the RL policy are trained with each
learning rate of that setting's grid, and the best learning rate is kept (held-out reward-model
accuracy; held-out VADER score of the policy). RL runs against one shared reward model (the
real-model pipeline's, LoRA r8), so the RL columns compare policy training alone.

Each run is its own process (``--child``), so its peak RSS is its own; time per step is the
stage's training wall time over its optimiser steps, and its CPU time (all threads) over them,
which stays comparable when other work shares the machine. Uses the data and model of
``python -m perlhf.quickstart_real --prepare-only`` under ``--root`` (made if missing). Writes
``<out>.json`` after every run (an interrupted run resumes) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = ("full", "lora-attn-r1", "lora-attn-r8", "lora-attn-r32", "lora-all-r8")
LR_GRID = {
    "reward": {"full": (1e-5, 3e-5, 1e-4, 3e-4), "lora": (2e-4, 5e-4, 2e-3, 5e-3)},
    "rl": {"full": (1.5e-5, 5e-5, 1.5e-4), "lora": (2e-4, 5e-4, 9e-4, 1.5e-3)},
}
"""Per stage and kind, a grid a factor ~3 apart around the usual choices, extended upwards where
the best learning rate sat at the top; the LoRA-vs-full ratio of the best learning rates is itself
a result ("LoRA Without Regret": ~10x)."""


def stage_overrides(stage: str, setting: str, lr: float, out: Path) -> dict[str, Any]:
    """Dotted overrides of ``configs/real/<stage>.yaml`` for one run."""
    config: dict[str, Any] = {
        "model.init_args.optimizer.init_args.lr": lr,
        "trainer.enable_progress_bar": False,
        "trainer.logger.init_args.save_dir": str(out / "logs"),
    }
    if setting == "full":
        config["model.init_args.model.finetune"] = "full"
    else:
        placement, rank = setting.removeprefix("lora-").split("-r")
        config["model.init_args.model.lora.r"] = int(rank)
        config["model.init_args.model.lora.alpha"] = 2 * int(rank)
        config["model.init_args.model.lora.target_modules"] = (
            "attention" if placement == "attn" else "all-linear"
        )
    return config


def child(stage: str, setting: str, lr: float, root: Path, out: Path, seed: int) -> dict[str, Any]:
    """One training run in this process; returns its metrics."""
    import torch

    from perlhf.quickstart import load_config, run_stage
    from perlhf.quickstart_real import DEFAULT_ROOT, REPO_CONFIGS, evaluate

    name = "reward" if stage == "reward" else "reinforce"
    config = load_config(
        name,
        root,
        {"seed_everything": seed, **stage_overrides(stage, setting, lr, out)},
        REPO_CONFIGS,
        DEFAULT_ROOT,
    )
    callbacks = config["trainer"]["callbacks"]
    if stage == "reward":  # no export (the shared reward model stays the pipeline's), no checkpoints
        keep = [c for c in callbacks if not c["class_path"].endswith(("ExportPretrained", "ModelCheckpoint"))]
        config["trainer"]["callbacks"] = keep
        config["trainer"]["enable_checkpointing"] = False
    else:
        for c in callbacks:
            if c["class_path"].endswith("ExportPretrained"):
                c["init_args"]["dirpath"] = str(out / "policy")
    t0, cpu0 = time.perf_counter(), time.process_time()
    cli = run_stage(config, out / f"{name}.yaml")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    steps = max(cli.trainer.global_step, 1)
    result: dict[str, Any] = {
        "stage": stage,
        "setting": setting,
        "lr": lr,
        "seed": seed,
        "trainable": sum(p.numel() for p in cli.model.parameters() if p.requires_grad),
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "cpu_seconds_per_step": cpu_seconds / steps,  # robust when other work shares the CPU
        "threads": torch.get_num_threads(),
    }
    if stage == "reward":
        result["accuracy"] = float(cli.trainer.callback_metrics["val/accuracy"])
    else:
        sampling = cli.datamodule.sampling
        ev = evaluate(
            root, out / "policy" / "merged", sampling["temperature"], sampling["max_new_tokens"], 96, seed
        )
        result |= {
            "judge_score": ev["rl"]["judge_score"],
            "start_judge_score": ev["start"]["judge_score"],
            "win_rate": ev["win_rate"],
            "kl_to_start": ev["rl"]["kl_to_start"],
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


KL_BOUND = 10.0
"""RL runs count towards a setting's best learning rate only at a KL to the start of at most this
many nats: a higher rate buys VADER score with drift (sycophancy), not a better policy."""


def _score(run: dict[str, Any]) -> tuple[bool, float]:
    """Sort key of a run within its (stage, setting): reward models by held-out accuracy; RL runs
    within ``KL_BOUND`` first, then by VADER score."""
    if run["stage"] == "reward":
        return True, run["accuracy"]
    return run["kl_to_start"] <= KL_BOUND, run["judge_score"]


def table(runs: list[dict[str, Any]]) -> str:
    """Best learning rate per (stage, setting), one row per setting."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        key = (r["stage"], r["setting"])
        if key not in best or _score(r) > _score(best[key]):
            best[key] = r
    lines = [
        "| setting | RM trainable | RM best LR | RM held-out accuracy | RM CPU s/step | RM peak RSS (MiB) "
        "| RL best LR | VADER score | win rate | KL | RL CPU s/step | RL peak RSS (MiB) |",
        "|---" * 12 + "|",
    ]
    for setting in SETTINGS:
        rm, rl = best.get(("reward", setting)), best.get(("rl", setting))
        if not rm and not rl:
            continue
        cells = [setting]
        cells += (
            [
                f"{rm['trainable']:,}",
                f"{rm['lr']:g}",
                f"{rm['accuracy']:.3f}",
                f"{rm['cpu_seconds_per_step']:.1f}",
                f"{rm['peak_rss_mib']:,.0f}",
            ]
            if rm
            else ["—"] * 5
        )
        cells += (
            [
                f"{rl['lr']:g}",
                f"{rl['judge_score']:+.3f}",
                f"{rl['win_rate']:.0%}",
                f"{rl['kl_to_start']:.2f}"
                + (f" (over {KL_BOUND:g})" if rl["kl_to_start"] > KL_BOUND else ""),
                f"{rl['cpu_seconds_per_step']:.1f}",
                f"{rl['peak_rss_mib']:,.0f}",
            ]
            if rl
            else ["—"] * 6
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coverage(runs: list[dict[str, Any]]) -> str:
    """A sentence naming the (stage, setting) pairs whose learning-rate grid is only partly run,
    so a "best LR" over fewer runs is not read as the grid's best; empty when every grid is whole."""
    ran: dict[tuple[str, str], set[float]] = {}
    for r in runs:
        ran.setdefault((r["stage"], r["setting"]), set()).add(r["lr"])
    partial = []
    for (stage, setting), lrs in ran.items():
        grid = LR_GRID[stage]["full" if setting == "full" else "lora"]
        if set(grid) - lrs:
            partial.append(f"{stage} {setting} (lr {', '.join(f'{lr:g}' for lr in sorted(lrs))} of the grid)")
    return f"**Partial grids**: {'; '.join(partial)}.\n\n" if partial else ""


def all_runs(runs: list[dict[str, Any]]) -> str:
    """Every run, in the order run."""
    lines = [
        "| stage | setting | lr | held-out accuracy or VADER score | win rate | KL | CPU s/step "
        "| wall s/step | peak RSS (MiB) |",
        "|---" * 9 + "|",
    ]
    for r in runs:
        if "accuracy" in r:
            score = f"{r['accuracy']:.3f} | — | —"
        else:
            score = f"{r['judge_score']:+.3f} | {r['win_rate']:.0%} | {r['kl_to_start']:.2f}"
        lines.append(
            f"| {r['stage']} | {r['setting']} | {r['lr']:g} | {score} | {r['cpu_seconds_per_step']:.1f} "
            f"| {r['seconds_per_step']:.1f} | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--stages", nargs="+", choices=("reward", "rl"), default=["reward", "rl"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="run only these learning rates of each grid (a quicker look)"
    )
    parser.add_argument("--root", default="checkpoints/real")
    parser.add_argument("--out", default="benchmarks/results/cpu/parity-real/parity")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "SETTING", "LR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    if args.child:
        stage, setting, lr = args.child
        run_dir = root / "parity" / f"{stage}-{setting}-lr{lr}"
        print(json.dumps(child(stage, setting, float(lr), root, run_dir, args.seed)))
        return
    from perlhf.quickstart_real import prepare

    prepare(root, seed=args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    runs: list[dict[str, Any]] = saved.get("runs", [])
    done = {(r["stage"], r["setting"], r["lr"], r["seed"]) for r in runs}
    for stage in args.stages:
        for setting in args.settings:
            for lr in LR_GRID[stage]["full" if setting == "full" else "lora"]:
                if (stage, setting, lr, args.seed) in done or (args.lrs and lr not in args.lrs):
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--root",
                    str(root),
                    "--seed",
                    str(args.seed),
                    "--child",
                    stage,
                    setting,
                    str(lr),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
                out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2))
    command = "python benchmarks/parity_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        "# LoRA vs full fine-tuning on SmolLM2-135M-Instruct (sentiment task, VADER judge)\n\n"
        f"`{command.strip()}`: {platform.processor() or platform.machine()}, seed {args.seed}; best "
        "learning rate of each setting's grid (all runs in the JSON). RL: REINFORCE against the shared "
        "LoRA r8 reward model; VADER score, win rate against the starting policy and KL on 96 "
        f"held-out prompts; the best RL learning rate is the best VADER score at a KL of at most "
        f"{KL_BOUND:g} nats. CPU s/step: the process's CPU time (all threads) per optimiser step; wall "
        "times are in the JSON.\n\n"
    )
    text = header + coverage(runs) + table(runs) + "\n\nAll runs:\n\n" + all_runs(runs) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
