"""Reward-model step time on the real model with and without perlhf's exact fast paths.

    python -m perlhf.quickstart_real --prepare-only       # the model and the sentiment pairs, once
    python benchmarks/fast_paths_real.py                  # -> results/cpu/fast-paths-real.{json,md}

SmolLM2-135M-Instruct with LoRA r8, one optimiser step (forward, backward, AdamW) on 8 pairs of
the real-model task (chat prompts with the model's own answers, as the pipeline trains on), for:
the plain path; ``share_prefix`` (each pair's prompt computed once); ``share_prefix`` on batches
from ``group_by_prompt`` (a prompt's pairs together, so each prompt and each of its 4 answers is
computed once for up to 6 pairs); LoRA on the top half of the blocks only (``lora.layers``); and
``share_prefix`` with it. Every variant sees the same batches, in one process,
after warm-up steps; the median over the timed steps is reported with the tokens the forward pass
computed. Take it on an otherwise idle machine.

``--rl`` times the RL update pass instead (``PPOModule(algorithm="rloo")``, LoRA r8 on all linear
layers, forward + backward over 8 prompts x 4 of the model's own sampled answers, the cached
``data/samples/train.jsonl``), with and without ``share_prompt``; it writes
``fast-paths-real-rl.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from perlhf.data import PreferenceDataModule
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import RewardModule
from perlhf.packing import pack_pairs

VARIANTS = {
    "plain": {"share_prefix": False, "layers": None, "grouped": False},
    "share_prefix": {"share_prefix": True, "layers": None, "grouped": False},
    "share_prefix + group_by_prompt": {"share_prefix": True, "layers": None, "grouped": True},
    "top-half LoRA": {"share_prefix": False, "layers": 15, "grouped": False},
    "share_prefix + top-half LoRA": {"share_prefix": True, "layers": 15, "grouped": False},
}


def write_results(
    out: Path, result: dict, title: str, note: str, columns: list[str], rows: list[list[str]]
) -> None:
    """``out.json`` (``result``) and ``out.md`` (``title``, a ``note`` line and one table), printed."""
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# {title}",
        "",
        note,
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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


def rl_batches(root: Path, tokenizer: Any, steps: int, prompts: int = 8) -> list[dict]:
    """Rollout batches of the model's own answers: ``prompts`` prompts x 4 answers each, prompts
    left-padded, responses right-padded after EOS (the RolloutDataModule's layout)."""
    from perlhf.data.rollout_utils import left_pad, right_pad

    rows = [json.loads(line) for line in (root / "data/samples/train.jsonl").read_text().splitlines()]
    batches = []
    for s in range(steps):
        prompt_ids, responses = [], []
        for row in rows[s * prompts : (s + 1) * prompts]:
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for answer in row["responses"]:
                prompt_ids.append(ids)
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
                responses.append(answer_ids + [tokenizer.eos_token_id])
        p_ids, p_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
        r_ids, r_mask = right_pad(responses, tokenizer.pad_token_id)
        batches.append(
            {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}
        )
    return batches


def rl_step_times(root: Path, share: bool, batches: list[dict], warmup: int) -> tuple[list[float], float]:
    """Forward + backward of the policy over each batch; returns the step times and the share of
    columns computed (packed tokens over the unshared rows' columns)."""
    from perlhf.modules import PPOModule
    from perlhf.packing import pack_groups

    config = ModelConfig(
        name_or_path=str(root / "smollm2-135m-instruct"),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
    )
    module = PPOModule(config, algorithm="rloo", share_prompt=share)
    module.configure_model()
    times, fractions = [], []
    for i, batch in enumerate(batches):
        idx = torch.arange(len(batch["prompt_ids"]))
        start = time.perf_counter()
        out = module._forward(batch, idx, with_values=False)
        mask = batch["response_mask"]
        ((out["logprobs"] * mask).sum() / mask.sum()).backward()
        module.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        packed = pack_groups(
            *(batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")), 0
        )
        fractions.append(packed.tokens / packed.unshared_tokens if share else 1.0)
    return times, statistics.mean(fractions)


def main_rl(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    root = Path(args.root)
    tokenizer = AutoTokenizer.from_pretrained(root / "smollm2-135m-instruct")
    batches = rl_batches(root, tokenizer, args.steps + args.warmup)
    rows = {}
    for name, share in (("unshared", False), ("share_prompt", True)):
        times, fraction = rl_step_times(root, share, batches, args.warmup)
        rows[name] = {
            "median_step_s": statistics.median(times),
            "steps_s": times,
            "columns_fraction": fraction,
        }
        print(name, f"{rows[name]['median_step_s']:.2f} s", flush=True)
    base = rows["unshared"]["median_step_s"]
    out = Path(args.out + "-rl")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/fast_paths_real.py --rl",
        "model": "SmolLM2-135M-Instruct, LoRA r8 all-linear, 8 prompts x 4 sampled answers per step, fp32",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__},
        "variants": rows,
    }
    note = (
        f"`{result['command']}`; {result['model']}; forward + backward of the policy; "
        f"{result['torch_threads']} threads; median of {args.steps} steps after {args.warmup} warm-up steps."
    )
    write_results(
        out,
        result,
        "RL update pass on SmolLM2-135M-Instruct: prompt sharing",
        note,
        ["variant", "step (s)", "speed-up", "columns computed (of the padded unshared rows)"],
        [
            [
                name,
                f"{row['median_step_s']:.2f}",
                f"{base / row['median_step_s']:.2f}x",
                f"{row['columns_fraction']:.2f}",
            ]
            for name, row in rows.items()
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="checkpoints/real")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu/fast-paths-real")
    parser.add_argument("--rl", action="store_true", help="time the RL update pass (share_prompt)")
    args = parser.parse_args()
    if args.rl:
        main_rl(args)
        return
    root = Path(args.root)
    batches, tokens = {}, {}
    for grouped in (False, True):
        data = PreferenceDataModule(
            path="json",
            data_files={"train": str(root / "data/preference/train.jsonl")},
            val_fraction=0.05,
            format="conversational",
            tokenizer=str(root / "smollm2-135m-instruct"),
            max_length=128,
            batch_size=8,
            group_by_prompt=grouped,
        )
        data.setup("fit")
        loader = iter(data.train_dataloader())
        batches[grouped] = [next(loader) for _ in range(args.steps + args.warmup)]
        timed = batches[grouped][args.warmup :]
        pad = data.tokenizer.pad_token_id
        tokens[grouped, False] = sum(int(b["attention_mask"].sum()) for b in timed)
        tokens[grouped, True] = sum(
            pack_pairs(b["input_ids"], b["attention_mask"], pad, b["prompt_lengths"]).tokens for b in timed
        )
    rows = {}
    for name, variant in VARIANTS.items():
        times = step_times(root, variant, batches[variant["grouped"]], args.warmup)
        rows[name] = {
            "median_step_s": statistics.median(times),
            "steps_s": times,
            "tokens_per_step": tokens[variant["grouped"], variant["share_prefix"]] / args.steps,
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
    note = (
        f"`{result['command']}`; {result['model']}; {result['torch_threads']} threads; median of "
        f"{args.steps} steps after {args.warmup} warm-up steps."
    )
    write_results(
        out,
        result,
        "Reward-model step on SmolLM2-135M-Instruct: exact fast paths",
        note,
        ["variant", "step (s)", "speed-up", "tokens computed per step"],
        [
            [
                name,
                f"{row['median_step_s']:.2f}",
                f"{base / row['median_step_s']:.2f}x",
                f"{row['tokens_per_step']:.0f}",
            ]
            for name, row in rows.items()
        ],
    )


if __name__ == "__main__":
    main()
