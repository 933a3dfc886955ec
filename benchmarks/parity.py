"""LoRA vs full fine-tuning on the built-in task — the paper's central claim, measured.

    python benchmarks/parity.py                      # ranks 1, 4, 16 and full; seeds 0, 1, 2
    python benchmarks/parity.py --seeds 0 --ranks 4  # a quicker look

For every seed, the quickstart's tiny base model, data and SFT model are built once (seeded);
then, for every setting (``full`` and each LoRA rank), a reward model is trained with that setting
and its held-out pairwise accuracy against gold labels recorded, and an RL policy is trained with
that setting against one shared reward model (the quickstart's default rank-8 LoRA one, so the RL
column compares policy training alone) and its mean gold score on held-out prompts recorded.
Writes ``benchmarks/results/parity.{md,json}`` (settings, seeds, means and per-seed values).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from perlhf.data import synthetic
from perlhf.quickstart import evaluate_policies, load_config, prepare, run_stage

# Learning rates per setting: full fine-tuning moves every weight and wants a smaller step, as in
# the paper, which tunes them separately.
FULL_LR = {"reward": 3e-4, "rl": 3e-4}


def overrides(stage: str, setting: str) -> dict[str, Any]:
    base = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    if setting == "full":
        return {
            **base,
            "model.init_args.model.finetune": "full",
            "model.init_args.optimizer.init_args.lr": FULL_LR[stage],
        }
    rank = int(setting.removeprefix("lora-r"))
    return {**base, "model.init_args.model.lora.r": rank, "model.init_args.model.lora.alpha": 2 * rank}


def run_seed(
    root: Path, seed: int, settings: list[str], algorithm: str, done: dict[str, dict[str, float]], save: Any
) -> dict[str, dict[str, float]]:
    """Every setting for one seed; ``done`` holds results of an earlier, interrupted run (skipped),
    ``save()`` is called after each setting so an interrupted run keeps what it measured."""
    prepare(root, seed=seed)
    quiet = {"seed_everything": seed, **overrides("sft", "lora-r8")}
    run_stage(load_config("sft", root, quiet), root / "configs" / "sft.yaml")
    run_stage(load_config("reward", root, quiet), root / "configs" / "reward.yaml")  # the shared RM
    results = done
    for setting in settings:
        if setting in results:
            continue
        out = root / setting
        t0 = time.perf_counter()
        rm_config = load_config(
            "reward",
            root,
            {
                "seed_everything": seed,
                **overrides("reward", setting),
                "trainer.logger.init_args.save_dir": str(out / "logs"),
                "trainer.callbacks": [],
                "trainer.enable_checkpointing": False,
            },
        )
        rm = run_stage(rm_config, out / "configs" / "reward.yaml")
        accuracy = float(rm.trainer.callback_metrics["val/accuracy"])
        rm_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        rl_config = load_config(algorithm, root, {"seed_everything": seed, **overrides("rl", setting)})
        rl_config["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
        for callback in rl_config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("ExportPretrained"):
                callback["init_args"]["dirpath"] = str(out / "policy")
        rl = run_stage(rl_config, out / "configs" / f"{algorithm}.yaml")
        rl_seconds = time.perf_counter() - t0
        sampling = rl.datamodule.sampling
        evals = evaluate_policies(
            root, {"rl": out / "policy" / "merged"}, sampling["temperature"], sampling["max_new_tokens"], seed
        )
        results[setting] = {
            "reward_accuracy": accuracy,
            "gold_score": evals["heldout"]["rl"]["gold_score"],
            "sft_gold_score": evals["heldout"]["sft"]["gold_score"],
            "kl_to_sft": evals["heldout"]["rl"]["kl_to_reference"],
            "trainable_reward": _trainable(rm.model),
            "trainable_policy": _trainable(rl.model),
            "reward_seconds": rm_seconds,
            "rl_seconds": rl_seconds,
        }
        print(f"seed {seed} {setting}: {results[setting]}", flush=True)
        save()
    return results


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def table(per_seed: dict[int, dict[str, dict[str, float]]], settings: list[str]) -> str:
    def stat(setting: str, key: str) -> tuple[float, float]:
        values = [per_seed[s][setting][key] for s in per_seed]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    full_acc = stat("full", "reward_accuracy")[0] if "full" in settings else None
    full_gold = stat("full", "gold_score")[0] if "full" in settings else None
    lines = [
        "| setting | trainable (RM / policy) | RM held-out accuracy | Δ vs full (points) "
        "| RL gold score (held-out) | Δ vs full (% of full) | KL to SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    first = next(iter(per_seed))

    def pm(sd: float, digits: int) -> str:
        return f" ± {sd:.{digits}f}" if len(per_seed) > 1 else ""

    for setting in settings:
        acc, acc_sd = stat(setting, "reward_accuracy")
        gold, gold_sd = stat(setting, "gold_score")
        kl, _ = stat(setting, "kl_to_sft")
        d_acc = "—" if full_acc is None or setting == "full" else f"{100 * (acc - full_acc):+.1f}"
        d_gold = "—"
        if full_gold is not None and setting != "full":
            d_gold = f"{100 * (gold - full_gold) / abs(full_gold):+.1f}%"
        row = per_seed[first][setting]
        lines.append(
            f"| {setting} | {row['trainable_reward']:,} / {row['trainable_policy']:,} "
            f"| {acc:.3f}{pm(acc_sd, 3)} | {d_acc} | {gold:.2f}{pm(gold_sd, 2)} | {d_gold} | {kl:.1f} |"
        )
    sft = statistics.mean(per_seed[s][settings[0]]["sft_gold_score"] for s in per_seed)
    lines.append("")
    lines.append(
        f"SFT policy gold score (held-out, mean over seeds): {sft:.2f}. "
        + ("± is the standard deviation over seeds." if len(per_seed) > 1 else "One seed: no spread.")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument("--algorithm", default="reinforce", choices=["reinforce", "ppo", "rloo"])
    parser.add_argument("--root", default="checkpoints/parity")
    parser.add_argument("--out", default="benchmarks/results/parity")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the table from <out>.json without training"
    )
    args = parser.parse_args(argv)
    settings = ([] if args.no_full else ["full"]) + [f"lora-r{r}" for r in args.ranks]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    per_seed: dict[int, dict[str, dict[str, float]]] = {
        int(seed): results for seed, results in saved.get("seeds", {}).items()
    }

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps({"settings": settings, "seeds": per_seed}, indent=2))

    if not args.table_only:
        for seed in args.seeds:
            per_seed[seed] = per_seed.get(seed, {})
            run_seed(Path(args.root) / f"seed{seed}", seed, settings, args.algorithm, per_seed[seed], save)
    complete = {seed: r for seed, r in sorted(per_seed.items()) if all(s in r for s in settings)}
    if not complete:
        raise SystemExit(f"no seed has results for every setting {settings} in {out.with_suffix('.json')}")
    text = table(complete, settings)
    runs = [r for results in complete.values() for r in results.values()]
    train_seconds = sum(r["reward_seconds"] + r["rl_seconds"] for r in runs)
    command = "python benchmarks/parity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# LoRA vs full fine-tuning on the built-in task ({args.algorithm})\n\n"
        f"`{command.strip()}` — seeds {sorted(complete)}, {train_seconds:.0f} s of training on "
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}. Reward model: {synthetic.__name__} task, 400 gold-labelled held-out "
        "pairs; RL: mean gold score of 256 samples on the 4 held-out phrasings.\n\n"
    )
    out.with_suffix(".md").write_text(header + text + "\n")
    print(header + text)


if __name__ == "__main__":
    main()
