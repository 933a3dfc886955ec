"""Reward-model step time on the real model with and without perlhf's exact fast paths.

    python -m perlhf.quickstart_real --prepare-only       # the model and the sentiment pairs, once
    python benchmarks/fast_paths_real.py                  # -> results/cpu/fast-paths-real.{json,md}

SmolLM2-135M-Instruct with LoRA r8, one optimiser step (forward, backward, AdamW) on 8 pairs of
the real-model task (chat prompts with the model's own answers, as the pipeline trains on), for:
the plain path; ``share_prefix`` (each pair's prompt computed once); LoRA on the top half of the
blocks only (``lora.layers``); and both. Every variant sees the same batches, in one process,
after warm-up steps; the median over the timed steps is reported with the tokens the forward pass
computed. Take it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from perlhf.data import PreferenceDataModule
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import RewardModule
from perlhf.packing import pack_pairs

VARIANTS = {
    "plain": {"share_prefix": False, "layers": None},
    "share_prefix": {"share_prefix": True, "layers": None},
    "top-half LoRA": {"share_prefix": False, "layers": 15},
    "share_prefix + top-half LoRA": {"share_prefix": True, "layers": 15},
}


def step_times(root: Path, variant: dict, batches: list[dict], warmup: int) -> list[float]:
    config = ModelConfig(
        name_or_path=str(root / "smollm2-135m-instruct"),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0, layers=variant["layers"]),
    )
    module = RewardModule(config, share_prefix=variant["share_prefix"])
    module.configure_model()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        chosen, rejected = module.pair_rewards(batch)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="checkpoints/real")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu/fast-paths-real")
    args = parser.parse_args()
    root = Path(args.root)
    data = PreferenceDataModule(
        path="json",
        data_files={"train": str(root / "data/preference/train.jsonl")},
        val_fraction=0.05,
        format="conversational",
        tokenizer=str(root / "smollm2-135m-instruct"),
        max_length=128,
        batch_size=8,
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.steps + args.warmup)]
    pad = data.tokenizer.pad_token_id
    unshared = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup :])
    packed = sum(pack_pairs(b["input_ids"], b["attention_mask"], pad).tokens for b in batches[args.warmup :])
    rows = {}
    for name, variant in VARIANTS.items():
        times = step_times(root, variant, batches, args.warmup)
        rows[name] = {
            "median_step_s": statistics.median(times),
            "steps_s": times,
            "tokens_per_step": (packed if variant["share_prefix"] else unshared) / args.steps,
        }
        print(name, f"{rows[name]['median_step_s']:.2f} s", flush=True)
    base = rows["plain"]["median_step_s"]
    result = {
        "command": "python benchmarks/fast_paths_real.py",
        "model": "SmolLM2-135M-Instruct, LoRA r8 attention, 8 pairs per step, fp32",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__},
        "variants": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Reward-model step on SmolLM2-135M-Instruct: exact fast paths",
        "",
        f"`{result['command']}`; {result['model']}; {result['torch_threads']} threads; median of "
        f"{args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| variant | step (s) | speed-up | tokens computed per step |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_step_s']:.2f} | {base / row['median_step_s']:.2f}x | "
            f"{row['tokens_per_step']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
