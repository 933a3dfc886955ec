"""PE-RLHF on a vision-language model, offline, in one command: reward model → RL → report.

    python -m perlhf.quickstart_vlm                  # a couple of minutes on 2 CPU cores
    python -m perlhf.quickstart_vlm --prepare-only   # just the tiny VLM and the task's data

It builds a tiny LLaVA-shaped VLM (``perlhf.tiny_vlm``) and the generated "shapes" image task
(``perlhf.data.shapes``, whose gold scorer reads the answer off the pixels), then runs the shipped
configs ``configs/quickstart-vlm/{reward,reinforce}.yaml`` through LightningCLI exactly as
``python cli.py fit --config ...`` would, and reports the reward model's held-out pairwise
accuracy and the gold accuracy of the base and the RL policy on held-out images (``report.md``).
The task's questions are about colour by default (``--kinds colour``): what a backbone pretrained
for seconds sees reliably; ``--kinds colour,shape,yesno`` asks about shapes too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from perlhf.data import shapes
from perlhf.paths import configs_dir
from perlhf.tiny_vlm import save_tiny_vlm

REPO_CONFIGS = configs_dir("quickstart-vlm")
DEFAULT_ROOT = "checkpoints/quickstart-vlm"
"""Where the shipped configs read and write; ``--root`` rebases every such path."""


def prepare(
    root: str | Path = DEFAULT_ROOT, force: bool = False, seed: int = 0, kinds: tuple[str, ...] = ("colour",)
) -> Path:
    """Write under ``root`` (each skipped if present): ``tiny-llava/`` (VLM + processor, pretrained
    for a few seconds), ``data/pairs/{train,test}.parquet`` (preference pairs), and
    ``data/prompts.parquet`` / ``data/heldout_prompts.parquet`` (RL; images the reward model never saw)."""
    root = Path(root)
    if force or not (root / "tiny-llava" / "config.json").exists():
        save_tiny_vlm(root / "tiny-llava", seed=seed, pretrain_steps=300)
    data = root / "data"
    files = {
        data / "pairs" / "train.parquet": lambda: shapes.preference_pairs(2000, seed + 1, kinds),
        data / "pairs" / "test.parquet": lambda: shapes.preference_pairs(200, seed + 2, kinds),
        data / "prompts.parquet": lambda: shapes.prompts(1000, seed + 3, kinds),
        data / "heldout_prompts.parquet": lambda: shapes.prompts(200, seed + 4, kinds),
    }
    for path, rows in files.items():
        if force or not path.exists():
            shapes.write_parquet(rows(), path)
    return root


def load_config(name: str, root: str | Path) -> dict[str, Any]:
    """``configs/quickstart-vlm/<name>.yaml`` with ``checkpoints/quickstart-vlm`` rebased to ``root``."""
    text = (REPO_CONFIGS / f"{name}.yaml").read_text().replace(DEFAULT_ROOT, str(root))
    return yaml.safe_load(text)


@torch.no_grad()
def gold_accuracy(model_dir: Path, prompts_file: Path, temperature: float, seed: int = 0) -> float:
    """Mean gold score (accuracy) of a VLM's sampled answers to the prompts in ``prompts_file``."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText

    from perlhf.data.images import (
        combine_vision,
        encode_with_images,
        image_inputs,
        load_processor,
        render_prompt,
    )
    from perlhf.data.rollout_utils import cut_at_eos, left_pad

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = load_processor(str(model_dir))
    tok = processor.tokenizer
    rows = load_dataset("parquet", data_files=str(prompts_file))["train"]
    images = [list(r) for r in rows["images"]]
    ids = [
        encode_with_images(processor, render_prompt(processor, q, 1), im)
        for q, im in zip(rows["prompt"], images, strict=True)
    ]
    prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id)
    vision = combine_vision([image_inputs(processor, im) for im in images])
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        **vision,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=3,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    responses, _, _ = cut_at_eos(out[:, prompt_ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
    answers = tok.batch_decode(responses, skip_special_tokens=True)
    scores = [shapes.gold_score(q, a, im) for q, a, im in zip(rows["prompt"], answers, images, strict=True)]
    return sum(scores) / len(scores)


def run(
    root: str | Path = DEFAULT_ROOT, seed: int = 0, kinds: tuple[str, ...] = ("colour",)
) -> dict[str, Any]:
    """Prepare, then reward model → RL → gold evaluation; returns the summary (also written to
    ``<root>/report.json``, with ``<root>/report.md``)."""
    from perlhf.cli import cli_main

    root = Path(root)
    start = time.perf_counter()
    prepare(root, seed=seed, kinds=kinds)
    seconds: dict[str, float] = {"prepare": time.perf_counter() - start}
    clis = {}
    for stage in ("reward", "reinforce"):
        print(f"\n=== {stage}: configs/quickstart-vlm/{stage}.yaml ===", flush=True)
        config = load_config(stage, root) | {"seed_everything": seed}
        path = root / "configs" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.perf_counter()
        clis[stage] = cli_main(["fit", "--config", str(path)])
        seconds[stage] = time.perf_counter() - t0
    t0 = time.perf_counter()
    temperature = clis["reinforce"].datamodule.sampling["temperature"]
    heldout = root / "data" / "heldout_prompts.parquet"
    gold = {
        "base": gold_accuracy(root / "tiny-llava", heldout, temperature, seed),
        "rl": gold_accuracy(root / "policy-reinforce" / "merged", heldout, temperature, seed),
    }
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    summary = {
        "reward_model_accuracy": float(clis["reward"].trainer.callback_metrics["val/accuracy"]),
        "gold_accuracy": gold,
        "kinds": list(kinds),
        "seconds": seconds,
    }
    chance = sum(1 / len(shapes.options(k)) for k in kinds) / len(kinds)
    text = "\n".join(
        [
            "# perlhf VLM quickstart report (shapes task, LoRA reward model + REINFORCE)",
            "",
            f"Questions: {', '.join(kinds)} (chance accuracy {chance:.2f}). "
            f"Wall time {seconds['total']:.0f} s (prepare {seconds['prepare']:.0f} s, "
            f"reward model {seconds['reward']:.0f} s, "
            f"RL {seconds['reinforce']:.0f} s, evaluation {seconds['eval']:.0f} s).",
            "",
            f"**Reward model**: held-out pairwise accuracy **{summary['reward_model_accuracy']:.3f}**.",
            "",
            f"**RL**: gold accuracy on {heldout.name} (sampled at temperature {temperature}): "
            f"base {gold['base']:.3f} → RL **{gold['rl']:.3f}**.",
            "",
        ]
    )
    (root / "report.md").write_text(text)
    (root / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{text}\nwritten to {root / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where the model, data, logs and report go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="colour", help="question kinds: colour,shape,yesno")
    parser.add_argument("--prepare-only", action="store_true", help="write the model and data, then stop")
    parser.add_argument("--force", action="store_true", help="rewrite the tiny model and data")
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if args.prepare_only:
        prepare(args.root, args.force, args.seed, kinds)
        print(f"VLM quickstart model and data ready under {args.root}")
        return
    if args.force:
        prepare(args.root, True, args.seed, kinds)
    run(args.root, args.seed, kinds)


if __name__ == "__main__":
    main()
