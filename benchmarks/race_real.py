"""perlhf against TRL on a real model (SmolLM2-135M-Instruct): the same reward-model and RL jobs,
time, memory and quality, side by side.

    python -m perlhf.quickstart_real --root /tmp/real         # once: model, data, reward model
    python benchmarks/race_real.py --root /tmp/real            # every job (~30 min on 2 cores)
    python benchmarks/race_real.py --root /tmp/real --jobs rm-hh --rm-steps 4 --eval-pairs 16

Needs TRL (``pip install -e ".[bench]"``); perlhf itself never imports it. Jobs:

- ``rm-hh``: pairwise reward model on HH-like pairs: the real task's preference pairs, each prompt
  preceded by ``--hh-turns`` earlier exchanges of the same split (a long shared transcript, a short
  answer, as in Anthropic HH). ``rm-short``: the same pairs without the transcript. Both sides
  train on identical token ids (SmolLM2's chat template applied once, here) in the same order:
  TRL ``RewardTrainer`` against ``RewardModule(share_prefix=True)`` + ``lightning.Trainer``. Quality:
  accuracy on held-out pairs after the same steps, scored by one function for both.
- ``rloo``, ``grpo``: TRL ``RLOOTrainer`` / ``GRPOTrainer`` (no vLLM) against
  ``PPOModule(algorithm=...)`` + ``RolloutDataModule`` on the real task's prompts, rewarded by the
  frozen reward model ``ROOT/reward-model/adapter`` (the quickstart's), for the same number of
  rollouts. Quality: the gold judge (VADER) on held-out prompts, win rate against the starting
  policy and KL to it (``perlhf.quickstart_real.evaluate``, one seeded sample per prompt), for
  each trained policy in a fresh process.

Same for both sides: LoRA r8 (alpha 16, dropout 0) on every linear layer, fp32, torch AdamW with
the same schedule (reward model: ``--rm-schedule``, by default cosine decay to 0 over the run, as in
``configs/real/reward.yaml``: at a constant lr 2e-3 the last steps swing so much that rounding
differences alone moved held-out accuracy by ±0.07; RL: constant), no checkpointing, evaluation or
logging during the timed steps. Each
(job, framework) runs in its own worker process (``--worker SPEC --result OUT``). Writes
``benchmarks/results/<device>/race-real/race.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import race_trl  # noqa: E402
from bench_jobs import _trainer  # noqa: E402

FRAMEWORKS = ("perlhf", "trl")
FULL = "perlhf-full"  # --frameworks perlhf-full: full fine-tuning, the paper's baseline for LoRA
FULL_LR_FACTOR = 0.1  # full fine-tuning's lr: a tenth of LoRA's ("LoRA Without Regret", 2025)
LABELS = {"perlhf": "perlhf", "trl": "TRL", FULL: "perlhf, full fine-tuning (lr ×0.1)"}
JOBS = ("rm-hh", "rm-short", "rloo", "grpo")
PHASES = ("generate", "score", "old_logprobs", "reference", "update", "other")
RANK, ALPHA = 8, 16
RM_LR, RL_LR = 2e-3, 5e-4  # configs/real/{reward,reinforce}.yaml
KL = {"rloo": 0.05, "grpo": 0.04}  # rloo: k1 in the reward (TRL's default); grpo: k3 in the loss
CLIP, MAX_GRAD_NORM = 0.2, 1.0
MODEL_DIR = "smollm2-135m-instruct"
DEFAULTS = {
    "rm_steps": 30,
    "rm_pairs": 8,
    "hh_turns": 3,
    "eval_pairs": 96,
    "rl_steps": 8,
    "rl_prompts": 8,
    "rl_samples": 4,
    "minibatch": 16,
    "new_tokens": 40,
    "temperature": 0.7,
    "eval_prompts": 96,
    "warmup": 1,
    "rm_schedule": "cosine",
}
RM_SCHEDULES = ("cosine", "constant")


# ------------------------------------------------------------------------------------------ data
def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / MODEL_DIR)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pairs(
    root: Path, split: str, hh_turns: int, limit: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """``limit`` preference pairs of ``split`` as (chosen, rejected) token ids with the chat template
    applied. With ``hh_turns``, each prompt is preceded by that many user/assistant exchanges drawn
    (seeded) from the split's other pairs: a long prompt both answers share."""
    tokenizer = _tokenizer(root)
    rows = _rows(root / "data" / "preference" / f"{split}.jsonl")
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows[:limit]):
        history: list[dict] = []
        for j in rng.sample([j for j in range(len(rows)) if j != i], hh_turns):
            history += [*rows[j]["prompt"], *rows[j]["chosen"]]
        ids = []
        for answer in (row["chosen"], row["rejected"]):
            text = tokenizer.apply_chat_template([*history, *row["prompt"], *answer], tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append((ids[0], ids[1]))
    return out


def collate(chunk: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """A pairwise batch ``(2B, L)``, chosen rows first, right-padded (as TRL's collator)."""
    import torch

    rows = [c for c, _ in chunk] + [r for _, r in chunk]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_accuracy(score: Any, data: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 8) -> float:
    """Share of pairs whose chosen answer ``score(input_ids, attention_mask) -> (N,)`` ranks higher."""
    import torch

    right = 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            b = collate(data[start : start + batch], pad_id)
            chosen, rejected = score(b["input_ids"], b["attention_mask"]).float().chunk(2)
            right += int((chosen > rejected).sum())
    return right / len(data)


# --------------------------------------------------------------------------------------- workers
def run_worker(spec: dict) -> dict:
    """Measure one (job, framework) in this process; returns the result record."""
    if spec["job"] == "judge":
        return _judge(spec)
    import lightning.pytorch  # noqa: F401
    import torch

    from perlhf.utils import peak_memory_mb

    if spec["framework"] == "trl":
        import trl  # noqa: F401
        from trl import GRPOTrainer, RewardTrainer, RLOOTrainer  # noqa: F401  (lazy modules up front)
    else:
        import perlhf.data  # noqa: F401
        import perlhf.modules  # noqa: F401
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    record: dict[str, Any] = {
        "job": spec["job"],
        "framework": spec["framework"],
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "device_name": bench.cpu_model(),
        "import_rss_mb": peak_memory_mb(torch.device("cpu")),
    }
    torch.manual_seed(spec["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        if spec["job"].startswith("rm"):
            (_trl_reward if spec["framework"] == "trl" else _perlhf_reward)(spec, tmp, record)
        else:
            (_trl_rl if spec["framework"] == "trl" else _perlhf_rl)(spec, tmp, record)
    record.update(bench._memory(torch.device("cpu")))
    return record


def _reward_data(spec: dict) -> tuple[list, list, int]:
    root, turns = Path(spec["root"]), spec["hh_turns"] if spec["job"] == "rm-hh" else 0
    n = spec["rm_pairs"] * (spec["warmup"] + spec["rm_steps"])
    train = pairs(root, "train", turns, n, spec["seed"])
    if len(train) < n:
        raise SystemExit(f"{len(train)} training pairs in {root}/data/preference, {n} needed")
    test = pairs(root, "val", turns, spec["eval_pairs"], spec["seed"] + 1)
    return train, test, _tokenizer(root).pad_token_id


def _rm_record(spec: dict, clock: bench.PhaseClock, train: list, accuracy: float, losses: list) -> dict:
    """The reward-model record; ``losses``: each step's training loss (0-dim tensors)."""
    steps = clock.steps[spec["warmup"] :]
    step_s = statistics.median(s["batch_s"] for s in steps)
    tokens = sum(len(c) + len(r) for c, r in train) / (len(train) / spec["rm_pairs"])
    return {
        "steps": len(steps),
        "step_s": step_s,
        "step_cpu_s": statistics.median(s["cpu_batch_s"] for s in steps),
        "step_times_s": [s["batch_s"] for s in clock.steps],
        "pairs_per_s": spec["rm_pairs"] / step_s,
        "tokens_per_step": tokens,
        "accuracy": accuracy,
        "losses": [float(x) for x in losses],  # every step's, warm-up included: the tools' curves
    }


def _perlhf_reward(spec: dict, tmp: str, record: dict) -> None:
    import torch
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader

    from perlhf.models import count_parameters
    from perlhf.modules import RewardModule

    train, test, pad_id = _reward_data(spec)
    b = spec["rm_pairs"]
    batches = [collate(train[i : i + b], pad_id) for i in range(0, len(train), b)]
    config, lr = _perlhf_model(spec, Path(spec["root"]), RM_LR)
    module = RewardModule(
        config,
        share_prefix=spec["share_prefix"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        scheduler=rm_scheduler(spec),
    )
    clock = bench.PhaseClock(False)
    losses: list[Any] = []

    def on_start(trainer: Any, module: Any) -> None:
        record["trainable_params"], record["total_params"] = count_parameters(module)

    class Losses(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            losses.append(outputs["loss"].detach())

    callbacks = [bench._step_timer(clock, on_start), Losses()]
    trainer = _trainer({"device": "cpu"}, _FP32, callbacks, tmp)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    module.eval()
    accuracy = pair_accuracy(module, test, pad_id)
    record.update(_rm_record(spec, clock, train, accuracy, losses))


def rm_scheduler(spec: dict) -> Any:
    """perlhf's reward-model lr schedule for ``spec["rm_schedule"]``: ``None`` (constant) or
    cosine decay to 0 over the run, the curve of transformers' ``"cosine"`` with no warm-up,
    ``lr · ½(1 + cos(π · step / total))``, stepped per optimiser step."""
    if spec["rm_schedule"] == "constant":
        return None
    import torch

    total = spec["warmup"] + spec["rm_steps"]
    return lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def _trl_reward(spec: dict, tmp: str, record: dict) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from perlhf.scoring import sequence_scores

    train, test, pad_id = _reward_data(spec)
    args = RewardConfig(
        **_trl_args(spec, tmp, spec["warmup"] + spec["rm_steps"], RM_LR)
        | {"lr_scheduler_type": spec["rm_schedule"]},
        per_device_train_batch_size=spec["rm_pairs"],
        train_sampling_strategy="sequential",
        max_length=None,
        max_grad_norm=0.0,  # RewardModule: no clipping unless the Trainer is told to
    )
    clock = bench.PhaseClock(False)
    trainer = RewardTrainer(
        model=str(Path(spec["root"]) / MODEL_DIR),
        args=args,
        train_dataset=Dataset.from_dict(
            {"chosen_ids": [c for c, _ in train], "rejected_ids": [r for _, r in train]}
        ),
        processing_class=_tokenizer(Path(spec["root"])),
        peft_config=_lora("SEQ_CLS"),
        callbacks=[race_trl._trl_timer(clock, race_trl._on_start(record, CPU))],
    )
    losses: list[Any] = []
    compute_loss = trainer.compute_loss

    def recorded_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = compute_loss(model, inputs, *args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = recorded_loss
    trainer.train()
    model = trainer.model.eval()
    accuracy = pair_accuracy(lambda ids, mask: sequence_scores(model, ids, mask), test, pad_id)
    record.update(_rm_record(spec, clock, train, accuracy, losses))


CPU = SimpleNamespace(type="cpu")  # the device race_trl's helpers are given (they read ``.type``)
_FP32 = bench.parse_setting("lora-r8", False, "32-true")  # the Lightning Trainer's precision


def _lora(task_type: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"
    )


def _trl_args(spec: dict, tmp: str, steps: int, lr: float) -> dict[str, Any]:
    """``TrainingArguments`` both TRL trainers share here (race_trl's, with this race's values)."""
    args = race_trl._common_args({**spec, "steps": steps, "warmup": 0, "precision": "32-true"}, CPU, tmp)
    return args | {"learning_rate": lr, "weight_decay": 0.0, "disable_dropout": True}


def _prompts(root: Path, split: str) -> list[list[dict]]:
    return [row["prompt"] for row in _rows(root / "data" / f"{split}.jsonl")]


def _perlhf_rl(spec: dict, tmp: str, record: dict) -> None:
    import torch

    from perlhf.data import RolloutDataModule
    from perlhf.models import count_parameters
    from perlhf.modules import PPOModule
    from perlhf.modules.rl_config import KLSpec, PPOSpec

    root, algorithm = Path(spec["root"]), spec["job"]
    n = spec["rl_prompts"] * spec["rl_samples"]
    grpo = algorithm == "grpo"
    config, lr = _perlhf_model(spec, root, RL_LR)
    module = PPOModule(
        config,
        algorithm=algorithm,
        ppo=PPOSpec(
            epochs=1,
            minibatch_size=spec["minibatch"],
            gradient_accumulation=n // spec["minibatch"],
            cliprange=CLIP,
            max_grad_norm=MAX_GRAD_NORM,
            loss_aggregation="grpo",
        ),
        kl=KLSpec(coef=KL[algorithm], estimator="k3" if grpo else "k1", penalty="loss" if grpo else "reward"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        log_samples_every=0,
    )
    data = RolloutDataModule(
        path="json",
        data_files={"train": str(root / "data" / "prompts.jsonl")},
        reward_model=str(root / "reward-model" / "adapter"),
        prompts_per_rollout=spec["rl_prompts"],
        samples_per_prompt=spec["rl_samples"],
        rollouts_per_epoch=spec["warmup"] + spec["rl_steps"],
        max_new_tokens=spec["new_tokens"],
        temperature=spec["temperature"],
        seed=spec["seed"],
    )
    clock = bench.PhaseClock(False)
    lengths: list[float] = []

    def rollout(fn: Any) -> Any:
        def timed(prompts: list, train: bool) -> dict:
            batch = fn(prompts, train)
            stats = batch["stats"]
            clock.add("generate", stats["rollout/generate_s"])
            clock.add("score", stats["rollout/score_s"])
            lengths.append(float(batch["response_mask"].sum(-1).float().mean()))
            return batch

        return timed

    def on_start(trainer: Any, module: Any) -> None:
        record["trainable_params"], record["total_params"] = count_parameters(module)
        data._rollout = rollout(data._rollout)
        module._forward = clock.wrap(module._forward, "old_logprobs", lambda: not torch.is_grad_enabled())
        module.reference_logprobs = clock.wrap(module.reference_logprobs, "reference")
        module._update = clock.wrap(module._update, "update")

    trainer = _trainer({"device": "cpu"}, _FP32, [bench._step_timer(clock, on_start)], tmp)
    trainer.fit(module, datamodule=data)
    module.save_pretrained(Path(spec["policy_out"]), merged=True)
    _rl_record(spec, clock, lengths, record)


def _perlhf_model(spec: dict, root: Path, lora_lr: float) -> tuple[Any, float]:
    """perlhf's ``ModelConfig`` and learning rate: LoRA, or for ``perlhf-full`` full fine-tuning."""
    from perlhf.models import LoraSpec, ModelConfig

    full = spec["framework"] == FULL
    lora = LoraSpec(r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear")
    config = ModelConfig(
        name_or_path=str(root / MODEL_DIR),
        finetune="full" if full else "lora",
        lora=lora,
        disable_dropout=True,  # as TRL's ``disable_dropout=True`` (SmolLM2 has none; stand-ins may)
    )
    return config, lora_lr * FULL_LR_FACTOR if full else lora_lr


def _rl_record(spec: dict, clock: bench.PhaseClock, lengths: list[float], record: dict) -> None:
    n = spec["rl_prompts"] * spec["rl_samples"]
    record.update(bench.rl_step_record(clock, spec["warmup"], PHASES, n, spec["new_tokens"]))
    record["response_tokens"] = statistics.mean(lengths[spec["warmup"] :])
    record["tokens_per_s"] = record["samples_per_s"] * record["response_tokens"]
    record["policy"] = spec["policy_out"]


def _trl_rl(spec: dict, tmp: str, record: dict) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from perlhf.data.rollout_utils import load_reward_model

    root, algorithm = Path(spec["root"]), spec["job"]
    n, k = spec["rl_prompts"] * spec["rl_samples"], spec["rl_samples"]
    tokenizer = _tokenizer(root)
    tokenizer.padding_side = "left"
    reward_model, reward_tokenizer = load_reward_model(str(root / "reward-model" / "adapter"))
    common = _trl_args(spec, tmp, spec["warmup"] + spec["rl_steps"], RL_LR) | {
        "per_device_train_batch_size": spec["minibatch"],
        "gradient_accumulation_steps": n // spec["minibatch"],  # one generation batch, one optimiser step
        "num_generations": k,
        "max_completion_length": spec["new_tokens"],
        "temperature": spec["temperature"],
        "top_p": 1.0,
        "top_k": 0,
        "num_iterations": 1,
        "beta": KL[algorithm],
        "epsilon": CLIP,
        "max_grad_norm": MAX_GRAD_NORM,
    }
    if algorithm == "rloo":
        config, cls = RLOOConfig(**common, normalize_advantages=True), RLOOTrainer
    else:
        config, cls = GRPOConfig(**common, loss_type="grpo", scale_rewards="group"), GRPOTrainer
    clock = bench.PhaseClock(False)
    trainer = cls(
        model=str(root / MODEL_DIR),
        reward_funcs=reward_model,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": _prompts(root, "prompts")}),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        peft_config=_lora("CAUSAL_LM"),
        callbacks=[race_trl._trl_timer(clock, race_trl._on_start(record, CPU))],
    )
    lengths: list[float] = []

    def generate(*args: Any, **kwargs: Any) -> Any:
        out = generate_fn(*args, **kwargs)
        completions = out[0] if isinstance(out, tuple) else out  # GRPO: (ids, logprobs)
        lengths.append(statistics.mean(len(c) for c in completions))
        return out

    def logprobs(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return logprobs_fn(*args, **kwargs)
        # Under no_grad: the rollout policy's log-probs (when TRL needs them) or, adapters
        # disabled, the reference's.
        name = "reference" if lora_layer.disable_adapters else "old_logprobs"
        return clock.wrap(logprobs_fn, name)(*args, **kwargs)

    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_layer = next(m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))

    generate_fn, logprobs_fn = trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies
    trainer._generate_single_turn = clock.wrap(generate, "generate")
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "score")
    trainer._get_per_token_logps_and_entropies = logprobs
    trainer._prepare_inputs = clock.wrap(trainer._prepare_inputs, "prepare")
    trainer.train()
    for step in clock.steps:
        step["update"] = step["batch_s"] - step.get("prepare", 0.0)
    trainer.model.merge_and_unload().save_pretrained(spec["policy_out"])
    _rl_record(spec, clock, lengths, record)


def _judge(spec: dict) -> dict:
    """The gold judge on held-out prompts for the trained policy ``spec['policy']``."""
    from perlhf import quickstart_real

    result = quickstart_real.evaluate(
        Path(spec["root"]),
        Path(spec["policy"]),
        spec["temperature"],
        spec["new_tokens"],
        spec["eval_prompts"],
    )
    rl, start = result["rl"], result["start"]
    keep = ("judge_score", "kl_to_start", "response_length", "distinct_2", "repeated_sentences")
    return {
        "job": "judge",
        "win_rate": result["win_rate"],
        "start_judge_score": start["judge_score"],
        **{k: rl[k] for k in keep},
        "samples": [f"{p} → {r}" for p, r in list(zip(result["prompts"], rl["responses"], strict=True))[:3]],
    }


# --------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="folder of `python -m perlhf.quickstart_real --root ROOT`")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    for key, value in DEFAULTS.items():
        choices = RM_SCHEDULES if key == "rm_schedule" else None
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value, choices=choices)
    p.add_argument(
        "--frameworks",
        nargs="+",
        choices=[*FRAMEWORKS, FULL],
        default=list(FRAMEWORKS),
        help=f"{FULL}: perlhf with full fine-tuning (lr a tenth of LoRA's), the paper's baseline",
    )
    p.add_argument(
        "--no-share-prefix", action="store_true", help="perlhf's reward model without prefix sharing"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--out", help="results folder (default benchmarks/results/<device>/race-real)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.worker:
        record = run_worker(json.loads(Path(args.worker).read_text()))
        Path(args.result).write_text(json.dumps(record, indent=1))
        return Path(args.result)
    if not args.root:
        raise SystemExit("--root: the folder of `python -m perlhf.quickstart_real --root ROOT` is needed")
    root = Path(args.root).resolve()
    needed = [root / MODEL_DIR, root / "data" / "preference" / "train.jsonl"]
    if {"rloo", "grpo"} & set(args.jobs):
        needed.append(root / "reward-model" / "adapter")
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `python -m perlhf.quickstart_real --root {root}` first")
    n = args.rl_prompts * args.rl_samples
    if args.rl_samples < 2 or n % args.minibatch:
        raise SystemExit("--rl-samples must be >= 2 and prompts × samples divisible by --minibatch")
    opts = {k: getattr(args, k) for k in DEFAULTS} | {"threads": args.threads, "seed": args.seed}
    opts |= {"root": str(root), "share_prefix": not args.no_share_prefix}
    out = Path(args.out) if args.out else HERE / "results" / "cpu" / "race-real"
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/race_real.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "versions": race_trl.versions(),
        "cpu": bench.cpu_model(),
        "options": opts,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # (job, tool) pairs not run this time keep their records from an earlier run into this folder.
    earlier = json.loads((out / "race.json").read_text()) if (out / "race.json").exists() else {}
    ran = {(job, fw) for job in args.jobs for fw in args.frameworks}
    results = [r for r in earlier.get("results", []) if (r.get("job"), r.get("framework")) not in ran]
    meta["commands"] = {
        **earlier.get("meta", {}).get("commands", {}),
        **{f"{job} {fw}": meta["command"] for job, fw in sorted(ran)},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as policies:
        jobs = [(job, fw) for job in args.jobs for fw in args.frameworks]
        for i, (job, framework) in enumerate(jobs):
            spec = {**opts, "job": job, "framework": framework, "policy_out": f"{policies}/{job}-{framework}"}
            record = bench.run_subprocess(spec, args.timeout, script=Path(__file__).resolve())
            if "error" not in record and "policy" in record:
                judged = bench.run_subprocess(
                    {**opts, "job": "judge", "policy": record["policy"]},
                    args.timeout,
                    script=Path(__file__).resolve(),
                )
                record["judge"] = judged
            results.append(record)
            print(
                f"[{i + 1}/{len(jobs)}] {job} {framework}: {_status(record)} ({record['wall_s']:.0f} s)",
                flush=True,
            )
            meta["wall_s"] = time.perf_counter() - start
            write_outputs(out, meta, results)
    print(f"wrote {out}/race.md, race.json, race.png ({time.perf_counter() - start:.0f} s)")
    return out


def _status(record: dict) -> str:
    if "error" in record:
        return f"error: {record['error'].strip().splitlines()[-1:]}"
    if record["job"].startswith("rm"):
        rate, accuracy = record["pairs_per_s"], record["accuracy"]
        return f"{rate:.2f} pairs/s, accuracy {accuracy:.3f}, peak {record['peak_mb']:,.0f} MiB"
    judge = record.get("judge", {})
    score = f", judge {judge['judge_score']:+.3f}" if "judge_score" in judge else ""
    return f"{record['samples_per_s']:.2f} samples/s{score}, peak {record['peak_mb']:,.0f} MiB"


# --------------------------------------------------------------------------------------- report
def _pairs_of(results: list[dict]) -> dict[str, dict[str, dict]]:
    by_job: dict[str, dict[str, dict]] = {}
    for r in results:
        if "error" not in r:
            by_job.setdefault(r["job"], {})[r["framework"]] = r
    return by_job


def _over(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _quality(job: str, record: dict) -> float:
    """Held-out accuracy (reward model) or the judge's mean score (RL)."""
    if job.startswith("rm"):
        return record["accuracy"]
    return record.get("judge", {}).get("judge_score", float("nan"))


def summary(results: list[dict]) -> dict[str, dict[str, float]]:
    """perlhf / TRL per job: throughput (higher favours perlhf), peak memory (lower favours perlhf)
    and quality difference (accuracy or judge score, perlhf − TRL)."""
    out = {}
    for job, rows in _pairs_of(results).items():
        if {"perlhf", FULL} <= set(rows):  # the paper's comparison: LoRA against full fine-tuning
            out[f"{job} lora/full"] = _ratios(job, rows["perlhf"], rows[FULL])
        if not set(FRAMEWORKS) <= set(rows):
            continue
        p, t = rows["perlhf"], rows["trl"]
        out[job] = _ratios(job, p, t)
        if "losses" in p and "losses" in t:
            out[job] |= loss_agreement(p["losses"], t["losses"])
    return out


def _ratios(job: str, a: dict, b: dict) -> dict[str, float]:
    """Record ``a`` against ``b``: throughput and peak-memory ratios, quality difference."""
    rate = "pairs_per_s" if job.startswith("rm") else "samples_per_s"
    return {
        "speed": a[rate] / b[rate],
        "memory": a["peak_mb"] / b["peak_mb"],
        "memory_over_imports": _over(a["peak_mb"] - a["import_rss_mb"], b["peak_mb"] - b["import_rss_mb"]),
        "quality_delta": _quality(job, a) - _quality(job, b),
    }


def loss_agreement(ours: list[float], theirs: list[float], early: int = 10, tol: float = 0.01) -> dict:
    """How closely two tools' per-step training losses agree: the largest gap over the first
    ``early`` steps, the first step (1-based) whose gap exceeds ``tol`` (``None``: none does), and
    the steps compared."""
    gaps = [abs(a - b) for a, b in zip(ours, theirs, strict=False)]
    first = next((i + 1 for i, g in enumerate(gaps) if g > tol), None)
    return {
        "loss_gap_early": max(gaps[:early], default=float("nan")),
        "loss_gap_first_step": first,
        "loss_steps": len(gaps),
    }


def _schedule(options: dict) -> str:
    return "cosine decay to 0 over the run" if options.get("rm_schedule") == "cosine" else "constant"


def render_markdown(meta: dict, results: list[dict]) -> str:
    o = meta["options"]
    n = o["rl_prompts"] * o["rl_samples"]
    lines = [
        "# perlhf vs TRL on SmolLM2-135M-Instruct: the same jobs, side by side",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(meta.get("commands", {}).values())) + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"CPU: {meta['cpu']}; torch threads: {o['threads'] or 'default'}; run {meta['started']}, "
        f"{meta.get('wall_s', 0) / 60:.1f} min in all.",
        "",
        f"Both sides: LoRA r{RANK} (alpha {ALPHA}, dropout 0) on every linear layer, fp32, torch AdamW "
        f"(weight decay 0), each (job, tool) in its own process; medians over the steps after "
        f"{o['warmup']} warm-up. Memory: the worker's peak RSS, and its rise over the RSS after imports.",
        "",
        f"- Reward model: {o['rm_pairs']} pairs per step, {o['rm_steps']} steps after the warm-up, "
        f"lr {RM_LR} ({_schedule(o)}), "
        f"the same token ids in the same order; accuracy on {o['eval_pairs']} held-out pairs after training. "
        f"HH-like: {o['hh_turns']} earlier exchanges before each prompt. perlhf: `RewardModule("
        f"share_prefix={o['share_prefix']})`; TRL: `RewardTrainer`.",
        f"- RL: {o['rl_prompts']} prompts × {o['rl_samples']} samples = {n} per rollout, up to "
        f"{o['new_tokens']} new tokens at temperature {o['temperature']} (EOS ends a response), one "
        f"optimiser step per rollout (minibatch {o['minibatch']}, accumulated), constant lr {RL_LR}, "
        f"clip {CLIP}, gradient-norm clip {MAX_GRAD_NORM}, {o['rl_steps']} rollouts after the warm-up; "
        f"the frozen reward model from the quickstart. RLOO: β {KL['rloo']} (k1, in the reward), whitened "
        f"advantages. GRPO: β {KL['grpo']} (k3, in the loss), group-normalised advantages, per-sequence "
        "mean loss. Quality: the VADER judge on "
        f"{o['eval_prompts']} held-out prompts, win rate and KL against the starting policy. Each tool "
        "samples its own prompts from the same set.",
        "",
    ]
    if any(r.get("framework") == FULL for r in results):
        lines[-1:-1] = [
            f"- {LABELS[FULL]}: perlhf on the same job with every weight trained (and, for RL, a frozen "
            f"copy of the model as the reference), at {FULL_LR_FACTOR:g}× LoRA's learning rate "
            f"({RM_LR * FULL_LR_FACTOR:g} reward model, {RL_LR * FULL_LR_FACTOR:g} RL): the paper's "
            "LoRA-vs-full resource comparison on this model.",
        ]
    by_job = _pairs_of(results)
    ratios = summary(results)
    for job in [j for j in JOBS if any(r.get("job") == j for r in results)]:
        rows = by_job.get(job, {})
        rm = job.startswith("rm")
        lines += [f"### {job}", ""]
        if rm:
            head = [
                "",
                "trainable",
                "tokens/step",
                "step (s)",
                "CPU s/step",
                "pairs/s",
                "accuracy",
                "peak MiB",
                "peak − imports",
            ]
        else:
            head = [
                "",
                "trainable",
                "step (s)",
                *(p.replace("_", " ") for p in PHASES),
                "samples/s",
                "resp. tokens",
                "judge",
                "win rate",
                "KL",
                "peak MiB",
                "peak − imports",
            ]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for fw in (*FRAMEWORKS, FULL):
            r = rows.get(fw)
            if r is None:
                continue
            mem = [f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] - r['import_rss_mb']:,.0f}"]
            if rm:
                cells = [
                    f"{r['tokens_per_step']:,.0f}",
                    f"{r['step_s']:.2f}",
                    f"{r['step_cpu_s']:.2f}",
                    f"{r['pairs_per_s']:.2f}",
                    f"{r['accuracy']:.3f}",
                ]
            else:
                j = r.get("judge", {})
                cells = [
                    f"{r['step_s']:.2f}",
                    *(f"{r['phases_s'][p]:.2f}" for p in PHASES),
                    f"{r['samples_per_s']:.2f}",
                    f"{r['response_tokens']:.1f}",
                    f"{j.get('judge_score', float('nan')):+.3f}",
                    f"{j.get('win_rate', float('nan')):.0%}",
                    f"{j.get('kl_to_start', float('nan')):.2f}",
                ]
            lines.append("| " + " | ".join([LABELS[fw], f"{r['trainable_params']:,}", *cells, *mem]) + " |")
        if job in ratios:
            s = ratios[job]
            lines += ["", _ratio_line("perlhf / TRL", s, rm)]
            if "loss_gap_early" in s:
                first = s["loss_gap_first_step"]
                lines.append(
                    f"Training losses step by step, |perlhf − TRL|: at most {s['loss_gap_early']:.1e} over "
                    f"the first 10 steps; "
                    + (
                        f"first above 0.01 at step {first} of {s['loss_steps']}"
                        if first
                        else f"never above 0.01 in {s['loss_steps']} steps"
                    )
                    + " (the same computation; rounding differences compound)."
                )
        if f"{job} lora/full" in ratios:
            lines.append(_ratio_line("perlhf, LoRA / full fine-tuning", ratios[f"{job} lora/full"], rm))
        if not rm:
            start = next((r["judge"]["start_judge_score"] for r in rows.values() if "judge" in r), None)
            if start is not None:
                lines.append(f"Starting policy's judge score: {start:+.3f}.")
        for r in results:
            if r.get("job") == job and "error" in r:
                lines.append(
                    f"\n**{r.get('framework', '?')} failed**: `{r['error'].strip().splitlines()[-1][:200]}`"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def _ratio_line(label: str, s: dict[str, float], rm: bool) -> str:
    return (
        f"{label}: **{s['speed']:.2f}×** {'pairs' if rm else 'samples'}/s, "
        f"**{s['memory']:.2f}×** peak memory ({s['memory_over_imports']:.2f}× over imports), "
        f"{'accuracy' if rm else 'judge score'} {s['quality_delta']:+.3f}."
    )


def write_outputs(out: Path, meta: dict, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "race.json").write_text(
        json.dumps({"meta": meta, "results": results, "summary": summary(results)}, indent=1)
    )
    (out / "race.md").write_text(render_markdown(meta, results))
    ratios = {job: r for job, r in summary(results).items() if "/" not in job}  # perlhf / TRL
    if ratios:
        plot(ratios, out / "race.png")


def plot(ratios: dict[str, dict[str, float]], path: Path) -> None:
    """Bars of perlhf / TRL throughput and peak memory per job (1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = list(ratios)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(jobs), 3.2))
    x = range(len(jobs))
    ax.bar(
        [i - 0.2 for i in x],
        [ratios[j]["speed"] for j in jobs],
        0.4,
        label="throughput (higher: perlhf faster)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [ratios[j]["memory"] for j in jobs],
        0.4,
        label="peak memory (lower: perlhf leaner)",
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), jobs)
    ax.set_ylabel("perlhf / TRL")
    ax.set_title("SmolLM2-135M-Instruct, CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
