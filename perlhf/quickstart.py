"""The whole PE-RLHF pipeline, offline, in one command: SFT → reward model → RL → report.

    perlhf quickstart                      # (or python -m perlhf.quickstart) ~100 s on 2 CPU cores
    perlhf quickstart --algorithm ppo      # or rloo, grpo, gold-reward
    perlhf quickstart --prepare-only       # just the tiny model, the task's data and the configs

It builds a tiny GPT-2-shaped model and the built-in "topic words" task (``perlhf.data.synthetic``,
whose hidden gold scorer plays the human), then runs the shipped LightningCLI configs
``configs/quickstart/{sft,reward,<algorithm>}.yaml`` one after the other, exactly as
``perlhf fit --config ...`` would, and ends with a report — the reward model's held-out
accuracy against gold labels, and the gold score, reward-model score, KL to the SFT model and
response length of the SFT and RL policies on held-out prompts, beside the reachable ceiling (the
best gold score of any response of the allowed length) — printed and written to
``<root>/report.md`` (+ ``report.json``), with a plot of the run at ``<root>/quickstart.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.data import synthetic
from perlhf.paths import configs_dir
from perlhf.tiny import save_tiny

REPO_CONFIGS = configs_dir("quickstart")
DEFAULT_ROOT = "checkpoints/quickstart"
"""Where the shipped quickstart configs read and write; ``--root`` rebases every such path."""
ALGORITHMS = ("reinforce", "ppo", "rloo", "grpo", "gold-reward")
"""RL configs (``configs/quickstart/<name>.yaml``); ``gold-reward`` is GRPO on the gold scorer itself."""
TARGETS = {"reward_accuracy": 0.85, "gold_gain": 0.30}
PRETRAIN_STEPS, COMPLETE_LIST_STEPS = 2000, 1600
"""Language-modelling steps of the tiny base (~25 s), the first 1,600 on complete lists only: a
base that conditions on what it already wrote, so that repeats are something RL can unlearn."""


def prepare(root: str | Path = DEFAULT_ROOT, force: bool = False, seed: int = 0) -> Path:
    """Write the tiny base model and the task's data under ``root`` (each skipped if present):

    - ``tiny-gpt2/``: tokenizer + GPT-2-shaped model, pretrained for ~25 s on task text
      (``PRETRAIN_STEPS``, complete lists first);
    - ``data/sft/{train,test}.jsonl``: demonstrations (prompt, completion);
    - ``data/preference/{train,val}.jsonl``: pairs labelled by the gold scorer through
      Bradley–Terry noise (train) and without noise (val, for held-out accuracy);
    - ``data/prompts.jsonl`` (RL, training phrasings) and ``data/heldout_prompts.jsonl`` (the
      phrasings no stage trains on);
    - ``configs/{sft,reward,reinforce,...}.yaml``: the shipped configs with their paths under
      ``root``, so ``perlhf fit --config <root>/configs/sft.yaml`` runs one stage from any checkout
      or installed wheel.
    """
    root = Path(root)
    model_dir = root / "tiny-gpt2"
    if force or not (model_dir / "config.json").exists():
        save_tiny(model_dir, "gpt2", seed, PRETRAIN_STEPS, COMPLETE_LIST_STEPS)
    data = root / "data"
    files: dict[Path, Callable[[], Any]] = {
        data / "sft" / "train.jsonl": lambda: synthetic.demonstrations(4000, seed=seed + 10),
        data / "sft" / "test.jsonl": lambda: synthetic.demonstrations(200, seed=seed + 11),
        data / "preference" / "train.jsonl": lambda: synthetic.preference_pairs(20000, seed=seed),
        data / "preference" / "val.jsonl": lambda: synthetic.preference_pairs(400, seed + 1, noisy=False),
        data / "prompts.jsonl": lambda: synthetic.prompts(2000, seed=seed + 2),
        data / "heldout_prompts.jsonl": lambda: synthetic.prompts(64, seed=seed + 3, split="heldout"),
    }
    for path, rows in files.items():
        if force or not path.exists():
            synthetic.write_jsonl(rows(), path)
    for name in ("sft", "reward", *ALGORITHMS):
        path = root / "configs" / f"{name}.yaml"
        if force or not path.exists():
            write_config(load_config(name, root, {"seed_everything": seed}), path)
    return root


# ------------------------------------------------------------------------------ configs


def load_config(
    name: str,
    root: str | Path,
    overrides: dict[str, Any] | None = None,
    configs: Path = REPO_CONFIGS,
    default_root: str = DEFAULT_ROOT,
) -> dict[str, Any]:
    """``<configs>/<name>.yaml`` (default ``configs/quickstart``) with its ``default_root`` paths
    (``checkpoints/quickstart``) rebased to ``root``, logs under ``<root>/logs`` and dotted-key
    ``overrides`` applied (``{"model.init_args.model.lora.r": 4}``)."""
    config = yaml.safe_load((configs / f"{name}.yaml").read_text())
    config = _rebase(config, str(root), default_root)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def _rebase(node: Any, root: str, default_root: str) -> Any:
    if isinstance(node, dict):
        return {k: _rebase(v, root, default_root) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, root, default_root) for v in node]
    if isinstance(node, str) and (node == default_root or node.startswith(default_root + "/")):
        return root + node[len(default_root) :]
    return node


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stage(config: dict[str, Any], path: Path, extra_args: list[str] | None = None) -> Any:
    """Write ``config`` to ``path`` and run ``perlhf fit --config path``; returns the LightningCLI."""
    from perlhf.cli import cli_main

    return cli_main(["fit", "--config", str(write_config(config, path)), *(extra_args or [])])


# ------------------------------------------------------------------------------ evaluation


def evaluate_policies(
    root: Path, policies: dict[str, Path], temperature: float, max_new_tokens: int, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"heldout"|"train": {policy: PolicyEval dict}}`` for the base and SFT models under
    ``root`` and each of ``policies`` (name -> model folder), sampled with the same seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perlhf.data.rollout_utils import load_reward_model
    from perlhf.evaluate import evaluate_policy

    tokenizer = AutoTokenizer.from_pretrained(root / "sft-model" / "merged")
    reward_model, reward_tokenizer = load_reward_model(str(root / "reward-model" / "adapter"), None)
    sft = AutoModelForCausalLM.from_pretrained(root / "sft-model" / "merged").eval()
    models = {"base": AutoModelForCausalLM.from_pretrained(root / "tiny-gpt2").eval(), "sft": sft}
    models |= {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in policies.items()}
    sets = {"heldout": (synthetic.prompt_pool("heldout"), 64), "train": (synthetic.prompt_pool("train"), 16)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split, (prompts, k) in sets.items():
        results[split] = {}
        for name, model in models.items():
            ev = evaluate_policy(
                model,
                tokenizer,
                prompts,
                synthetic.gold_score,
                reward_model,
                reward_tokenizer,
                reference=None if model is sft else sft,
                samples_per_prompt=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
            repeats = sum(map(synthetic.repeats_a_word, ev.responses)) / len(ev.responses)
            results[split][name] = ev.as_dict() | {"repeat_share": repeats}
    return results


@torch.no_grad()
def repeat_ratio(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, said: int = 3) -> float:
    """How likely ``model`` is to say a topic word again, relative to an average topic word, after
    a training phrasing and ``said`` of the topic's words: ``mean P(said word) / mean P(topic
    word)`` at the next word, over topics and phrasings. 1: it ignores what it wrote (a memoryless
    sampler); 0: it never repeats; above 1: it copies."""
    from perlhf.data.rollout_utils import encode

    def first_token(word: str) -> int:
        return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]

    ratios = []
    for prompt in synthetic.prompt_pool("train"):
        words = synthetic.TOPICS[synthetic.topic_of(prompt)]
        for start in range(0, len(words), said):
            context = [words[(start + i) % len(words)] for i in range(said)]
            ids = encode(tokenizer, prompt + " " + " ".join(context))
            probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            topic = probs[[first_token(w) for w in words]].mean()
            ratios.append((probs[[first_token(w) for w in context]].mean() / topic).item())
    return sum(ratios) / len(ratios)


def _policy_dirs(root: Path, rl: Path) -> dict[str, Path]:
    return {"base": root / "tiny-gpt2", "sft": root / "sft-model" / "merged", "rl": rl}


def _load_policy(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reachable_ceiling(tokenizer_dir: Path, max_new_tokens: int) -> float:
    """Mean over the held-out prompts of the best gold score a response can get when it must end
    (EOS) within ``max_new_tokens`` tokens of the policy's tokenizer (``synthetic.ceiling``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    pool = synthetic.prompt_pool("heldout")
    return sum(synthetic.ceiling(p, max_new_tokens - 1, count) for p in pool) / len(pool)


def report(summary: dict[str, Any]) -> str:
    """The markdown report of a quickstart run."""
    ev, rm = summary["eval"], summary["reward_model"]
    sft, rl = ev["heldout"]["sft"]["gold_score"], ev["heldout"]["rl"]["gold_score"]
    gain = (rl - sft) / abs(sft) if sft else float("nan")
    ceiling = summary["ceiling"]
    closed = (rl - sft) / (ceiling - sft) if ceiling > sft else float("nan")
    ok = {
        "reward_accuracy": rm["accuracy"] >= TARGETS["reward_accuracy"],
        "gold_gain": gain >= TARGETS["gold_gain"],
    }
    summary["gold_gain"], summary["ceiling_gap_closed"], summary["targets_met"] = gain, closed, ok
    mark = {True: "met", False: "MISSED"}
    lines = [
        f"# perlhf quickstart report ({summary['algorithm']}, {summary['finetune']})",
        "",
        f"Task: topic words (hidden gold scorer; at most {synthetic.MAX_WORDS} words count). "
        f"Wall time {summary['seconds']['total']:.0f} s "
        f"(SFT {summary['seconds']['sft']:.0f} s, reward model {summary['seconds']['reward']:.0f} s, "
        f"RL {summary['seconds']['rl']:.0f} s, evaluation {summary['seconds']['eval']:.0f} s).",
        "",
        f"**Reward model**: held-out pairwise accuracy against gold labels **{rm['accuracy']:.3f}** "
        f"({rm['pairs']} pairs; target ≥ {TARGETS['reward_accuracy']}: {mark[ok['reward_accuracy']]}).",
        "",
        f"**RL**: mean gold score on held-out phrasings {sft:.2f} (SFT) → **{rl:.2f}** (RL), "
        f"{gain:+.0%} (target ≥ +{TARGETS['gold_gain']:.0%}: {mark[ok['gold_gain']]}); "
        f"KL to the SFT policy {ev['heldout']['rl']['kl_to_reference']:.2f} nats per response.",
        "",
        f"**Ceiling**: the best gold score a response can get within {summary['max_new_tokens']} tokens "
        f"(EOS included) is **{ceiling:.2f}**; SFT reaches {sft / ceiling:.0%} of it, RL "
        f"{rl / ceiling:.0%}, closing {closed:.0%} of the gap from SFT to the ceiling.",
        "",
        f"**Repeats** (gold −0.5 each): {ev['heldout']['sft']['repeat_share']:.0%} of SFT responses and "
        f"{ev['heldout']['rl']['repeat_share']:.0%} of RL responses say a word twice. Chance of saying a "
        "topic word again, relative to an average topic word, after three of them (1 ignores what was "
        "written): base {base:.2f}, SFT {sft:.2f}, RL {rl:.2f}.".format(**summary["repeat_ratio"]),
    ]
    for split, title in (("heldout", "held-out phrasings"), ("train", "training phrasings")):
        rows = ev[split]
        n = rows["sft"]["samples"]
        lines += [
            "",
            f"Policies on {title} ({n} samples, temperature {summary['temperature']}):",
            "",
            "| policy | gold score | reward-model score | KL to SFT (nats) | length (tokens) | EOS "
            "| repeats a word |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("base", "sft", "rl"):
            r = rows[name]
            lines.append(
                f"| {name} | {r['gold_score']:.2f} | {r['reward_model_score']:.2f} | "
                f"{r['kl_to_reference']:.2f} | {r['response_length']:.1f} | {r['eos_fraction']:.0%} "
                f"| {r['repeat_share']:.0%} |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ driver


def run(
    root: str | Path = DEFAULT_ROOT,
    algorithm: str = "reinforce",
    overrides: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    plot: bool = True,
) -> dict[str, Any]:
    """Prepare, then SFT → reward model → RL → evaluation; returns the summary (also written to
    ``<root>/report.json``, with the report in ``<root>/report.md``).

    ``overrides`` maps a stage (``sft``, ``reward``, ``rl``) to dotted config overrides.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    root = Path(root)
    overrides = overrides or {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    prepare(root, seed=seed)
    configs = {"sft": "sft", "reward": "reward", "rl": algorithm}
    clis = {}
    for stage, name in configs.items():
        print(f"\n=== {stage}: configs/quickstart/{name}.yaml ===", flush=True)
        config = load_config(name, root, {"seed_everything": seed, **overrides.get(stage, {})})
        t0 = time.perf_counter()
        clis[stage] = run_stage(config, root / "configs" / f"{name}.yaml")
        seconds[stage] = time.perf_counter() - t0
    rm_metrics = clis["reward"].trainer.callback_metrics
    rl_data = clis["rl"].datamodule
    t0 = time.perf_counter()
    print("\n=== evaluation ===", flush=True)
    policy_dir = root / f"policy-{algorithm}" / "merged"
    evaluation = evaluate_policies(
        root, {"rl": policy_dir}, rl_data.sampling["temperature"], rl_data.sampling["max_new_tokens"], seed
    )
    dirs = _policy_dirs(root, policy_dir)
    ratios = {name: repeat_ratio(*_load_policy(path)) for name, path in dirs.items()}
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    summary: dict[str, Any] = {
        "algorithm": algorithm,
        "finetune": clis["rl"].model.config.finetune,
        "seed": seed,
        "temperature": rl_data.sampling["temperature"],
        "max_new_tokens": rl_data.sampling["max_new_tokens"],
        "ceiling": reachable_ceiling(root / "sft-model" / "merged", rl_data.sampling["max_new_tokens"]),
        "reward_model": {
            "accuracy": float(rm_metrics["val/accuracy"]),
            "pairs": len(clis["reward"].datamodule.datasets["val"]),
        },
        "eval": evaluation,
        "repeat_ratio": ratios,
        "runs": {stage: cli.trainer.log_dir for stage, cli in clis.items()},
        "seconds": seconds,
    }
    text = report(summary)
    (root / "report.md").write_text(text)
    (root / "report.json").write_text(json.dumps(summary, indent=2))
    if plot:
        from perlhf.plot import plot_run

        plot_run(summary["runs"]["reward"], summary["runs"]["rl"], root / "quickstart.png")
    written = f"{root / 'report.md'}" + (f" and {root / 'quickstart.png'}" if plot else "")
    print(f"\n{text}\nwritten to {written}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where models, data, logs and the report go")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="reinforce")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepare-only", action="store_true", help="write the model and data, then stop")
    parser.add_argument("--force", action="store_true", help="rewrite the tiny model and data")
    args = parser.parse_args(argv)
    if args.prepare_only or args.force:
        prepare(args.root, args.force, args.seed)
        configs = Path(args.root) / "configs"
        print(
            f"quickstart model, data and configs ready under {args.root}; one stage at a time: "
            f"perlhf fit --config {configs / 'sft.yaml'} (then reward.yaml, reinforce.yaml)"
        )
        if args.prepare_only:
            return
    run(args.root, args.algorithm, seed=args.seed)


if __name__ == "__main__":
    main()
