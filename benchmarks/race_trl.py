"""perlhf against TRL on the same job: reward-model training and RLOO, time and peak memory.

    python benchmarks/race_trl.py                          # device defaults (see --help)
    python benchmarks/race_trl.py --tasks rm --steps 5
    python benchmarks/race_trl.py --shapes tiny --steps 2 --warmup 1

Needs TRL (``pip install -e ".[bench]"``); perlhf itself never imports it. Backbones, tokenizer,
data and the frozen RL reward model are ``bench.py``'s (random weights built from configs, a
word-level tokenizer over the whole vocabulary), and the perlhf side is ``bench.py``'s worker
with a ``lora-r<rank>`` setting, so both sides train the same model on the same tokens:

- ``rm``: TRL ``RewardTrainer`` (peft ``LoraConfig``, task ``SEQ_CLS``) against ``RewardModule`` +
  ``lightning.Trainer``; the same ``bench.rm_batches`` in the same order. Step: optimiser step from
  ``on_step_begin`` to ``on_step_end`` (TRL) / ``on_train_batch_start`` to ``on_train_batch_end``
  (Lightning): forward, backward, optimiser step and each framework's per-step bookkeeping.
- ``rloo``: TRL ``RLOOTrainer`` with the frozen reward model as its reward function against
  ``PPOModule(algorithm="rloo")`` + ``RolloutDataModule``; the same prompts, exactly
  ``new_tokens`` sampled tokens (EOS and special tokens suppressed, ``min_new_tokens``), one
  optimiser step per rollout. Step: wall time between consecutive step ends (generation, scoring,
  old and reference log-probs, update, everything else).

Each (shape, task, framework) runs in its own worker process (``--worker SPEC --result OUT``), so
peak memory never mixes. Writes ``benchmarks/results/<device>/race-trl.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench.py next to this file, also when loaded by path (tests)
import bench  # noqa: E402

FRAMEWORKS = ("perlhf", "trl")
TASKS = ("rm", "rloo")
PHASES = ("generate", "score", "old_logprobs", "reference", "update", "other")
LR, WEIGHT_DECAY, LORA_DROPOUT, KL_COEF, CLIP = 1e-4, 0.01, 0.05, 0.05, 0.2  # perlhf's defaults

# bench.py's defaults, with RLOO's group: 2 samples per prompt (CPU: 16 samples, one minibatch;
# GPU: the paper's 128 episodes per batch, minibatches of 16 accumulated into one optimiser step).
DEFAULTS = {
    "cpu": {**bench.DEFAULTS["cpu"], "rl_samples": 2},
    "cuda": {**bench.DEFAULTS["cuda"], "rl_prompts": 64, "rl_samples": 2},
}


# --------------------------------------------------------------------------------------- workers
def run_worker(spec: dict) -> dict:
    """Measure one (task, framework) in this process; returns the result record."""
    if spec["framework"] == "perlhf":
        record = bench.run_worker({**spec, "setting": f"lora-r{spec['rank']}", "ppo_epochs": 1})
        if spec["task"] == "rloo":
            for step in record["phase_steps"]:
                step["old_logprobs"] = step["old_logprobs_values"]
                step["other"] += step["rollout_other"]
            steps = record["phase_steps"][spec["warmup"] :]
            record["phases_s"] = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in PHASES}
    else:
        record = _trl_worker(spec)
    record["framework"] = spec["framework"]
    if spec["task"] == "rm":
        record["pairs_per_s"] = spec["rm_pairs"] / record["step_s"]
    return record


def _trl_worker(spec: dict) -> dict:
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from trl import RewardTrainer, RLOOTrainer  # noqa: F401  (loads the lazy modules up front)

    from perlhf.utils import peak_memory_mb

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    record: dict[str, Any] = {
        "task": spec["task"],
        "shape": spec["shape"],
        "setting": f"lora-r{spec['rank']}",
        "rank": spec["rank"],
        "precision": spec["precision"],
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else bench.cpu_model(),
        "import_rss_mb": peak_memory_mb(torch.device("cpu")),
    }
    torch.manual_seed(spec.get("seed", 0))
    with tempfile.TemporaryDirectory() as root:
        (_trl_reward if spec["task"] == "rm" else _trl_rloo)(spec, device, root, record)
    record.update(bench._memory(device))
    return record


def _lora(spec: dict, task_type: str) -> Any:
    from peft import LoraConfig

    from perlhf.models import ATTENTION_TARGETS

    return LoraConfig(
        task_type=task_type,
        r=spec["rank"],
        lora_alpha=2 * spec["rank"],
        lora_dropout=LORA_DROPOUT,
        target_modules=ATTENTION_TARGETS[bench.SHAPES[spec["shape"]]["arch"]],
    )


def _common_args(spec: dict, device: Any, root: str) -> dict[str, Any]:
    """``TrainingArguments`` both TRL trainers share: perlhf's optimiser (torch AdamW, constant
    lr), precision, no checkpointing, evaluation, saving or logging."""
    return {
        "output_dir": root,
        "max_steps": spec["warmup"] + spec["steps"],
        "learning_rate": LR,
        "weight_decay": WEIGHT_DECAY,
        "optim": "adamw_torch",
        "lr_scheduler_type": "constant",
        "bf16": spec["precision"] == "bf16-mixed",
        "use_cpu": device.type == "cpu",
        "gradient_checkpointing": False,
        "model_init_kwargs": {"dtype": "float32"},
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": spec.get("seed", 0),
    }


def _trl_timer(clock: bench.PhaseClock, on_start: Callable[[Any], None]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """``batch_s``: optimiser step begin → end; ``interval_s``: previous step end → this end;
        ``cpu_*``: the same in process CPU time (as ``bench._step_timer``)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            on_start(model)
            clock.sync()
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.sync()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.sync()
            now, now_cpu = time.perf_counter(), time.process_time()
            clock.close(
                batch_s=now - self.start,
                interval_s=now - self.last,
                cpu_batch_s=now_cpu - self.start_cpu,
                cpu_interval_s=now_cpu - self.last_cpu,
            )
            self.last, self.last_cpu = now, now_cpu

    return StepTimer()


def _on_start(record: dict, device: Any) -> Callable[[Any], None]:
    def on_start(model: Any) -> None:
        record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record["total_params"] = sum(p.numel() for p in model.parameters())
        record["setup_peak_mb"] = bench._memory(device)["peak_mb"]

    return on_start


def _trl_reward(spec: dict, device: Any, root: str, record: dict) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    pairs = spec["rm_pairs"]
    rows: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    for batch in bench.rm_batches(spec):  # bench's batches, in order: chosen rows first
        rows["chosen_ids"] += batch["input_ids"][:pairs].tolist()
        rows["rejected_ids"] += batch["input_ids"][pairs:].tolist()
    args = RewardConfig(
        **_common_args(spec, device, root),
        per_device_train_batch_size=pairs,
        train_sampling_strategy="sequential",
        max_length=spec["rm_length"],
        max_grad_norm=0.0,  # Lightning's default: no clipping
        disable_dropout=False,  # RewardModule trains with the backbone's and LoRA's dropout
    )
    clock = bench.PhaseClock(device.type == "cuda")
    trainer = RewardTrainer(
        model=spec["policy"],
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=AutoTokenizer.from_pretrained(spec["tokenizer"]),
        peft_config=_lora(spec, "SEQ_CLS"),
        callbacks=[_trl_timer(clock, _on_start(record, device))],
    )
    trainer.train()
    steps = clock.steps[spec["warmup"] :]
    step_s = statistics.median(s["batch_s"] for s in steps)
    tokens = 2 * pairs * spec["rm_length"]
    record.update(
        {
            "steps": len(steps),
            "warmup": spec["warmup"],
            "step_s": step_s,
            "step_times_s": [s["batch_s"] for s in clock.steps],
            "interval_s": statistics.median(s["interval_s"] for s in steps),
            "step_cpu_s": statistics.median(s["cpu_batch_s"] for s in steps),
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s,
        }
    )


def _reward_model(spec: dict) -> Any:
    """bench's frozen reward model (adapter merged onto its base), as perlhf's loader builds it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    dtype = getattr(torch, spec["reward_dtype"])
    base = AutoModelForSequenceClassification.from_pretrained(spec["reward_base"], num_labels=1, dtype=dtype)
    model = PeftModel.from_pretrained(base, spec["reward"]).merge_and_unload()
    return model.requires_grad_(False).eval()


def _trl_rloo(spec: dict, device: Any, root: str, record: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    n_prompts, k, new_tokens = spec["rl_prompts"], spec["rl_samples"], spec["new_tokens"]
    n = n_prompts * k
    minibatch = min(spec["minibatch"], n)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"], padding_side="left")
    args = RLOOConfig(
        **_common_args(spec, device, root),
        per_device_train_batch_size=minibatch,
        gradient_accumulation_steps=n // minibatch,  # one generation batch of n, one optimiser step
        num_generations=k,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens, "suppress_tokens": list(bench.SPECIAL_IDS)},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=KL_COEF,  # k1 KL summed per sequence, subtracted from the reward: perlhf's default
        epsilon=CLIP,
        normalize_advantages=True,  # perlhf whitens advantages
        max_grad_norm=1.0,  # PPOSpec.max_grad_norm
        disable_dropout=True,  # PPOModule runs in eval mode
    )
    clock = bench.PhaseClock(device.type == "cuda")
    trainer = RLOOTrainer(
        model=spec["policy"],
        reward_funcs=_reward_model(spec),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": bench.rl_prompts(spec)}),
        processing_class=tokenizer,
        reward_processing_classes=AutoTokenizer.from_pretrained(spec["reward"]),
        peft_config=_lora(spec, "CAUSAL_LM"),
        callbacks=[_trl_timer(clock, _on_start(record, device))],
    )

    def generate(prompt_ids: list, *args: Any) -> list:
        completions = generate_fn(prompt_ids, *args)
        lengths = {len(p) for p in prompt_ids}, {len(c) for c in completions}
        if lengths != ({spec["prompt_length"]}, {new_tokens}) or len(completions) != n:
            raise RuntimeError(
                f"rollout is not fixed-size: {len(completions)} of (prompt, response) {lengths}"
            )
        return completions

    def logprobs(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return logprobs_fn(*args, **kwargs)
        # Under no_grad: first the rollout policy's log-probs, then the reference's (adapters off).
        name = "reference" if "old_logprobs" in clock.current else "old_logprobs"
        return clock.wrap(logprobs_fn, name)(*args, **kwargs)

    generate_fn, logprobs_fn = trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies
    trainer._generate_single_turn = clock.wrap(generate, "generate")
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "score")
    trainer._get_per_token_logps_and_entropies = logprobs
    trainer._prepare_inputs = clock.wrap(trainer._prepare_inputs, "prepare")
    trainer.train()
    for step in clock.steps:
        rollout = step.get("prepare", 0.0)
        step["update"] = step["batch_s"] - rollout
    record.update(bench.rl_step_record(clock, spec["warmup"], PHASES, n, new_tokens))


# --------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    bench.add_run_args(p, DEFAULTS, TASKS)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank, dropout 0.05)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], help="cpu: 32-true; gpu: bf16-mixed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.worker:
        record = run_worker(json.loads(Path(args.worker).read_text()))
        Path(args.result).write_text(json.dumps(record, indent=1))
        return Path(args.result)
    device, opts, shapes, tasks = bench.resolve_run(args, DEFAULTS, TASKS)
    n = opts["rl_prompts"] * opts["rl_samples"]
    opts["minibatch"] = min(opts["minibatch"], n)
    if opts["rl_samples"] < 2 or n % opts["minibatch"]:
        raise SystemExit("RLOO needs --rl-samples >= 2 and prompts × samples divisible by --minibatch")
    opts |= {"rank": args.rank, "threads": args.threads, "seed": args.seed, "live_memory": args.live_memory}
    command = "python benchmarks/race_trl.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "versions": versions(),
        "cpu": bench.cpu_model(),
        "options": opts,
        "shapes": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results: list[dict] = []
    out = Path(args.out) if args.out else None
    start = time.perf_counter()
    jobs = [(shape, task, fw) for shape in shapes for task in tasks for fw in FRAMEWORKS]
    for i, (shape, task, framework) in enumerate(jobs):
        info = bench.ensure_backbones(shape, Path(args.cache_dir).expanduser(), args.seed)
        meta["shapes"][shape] = {**bench.SHAPES[shape], "params": info["params"]}
        spec = {**opts, **{k: info[k] for k in ("policy", "tokenizer", "reward", "reward_base")}}
        spec |= {"shape": shape, "task": task, "framework": framework, "device": device}
        spec["gradient_accumulation"] = n // opts["minibatch"]
        record = bench.run_subprocess(spec, args.timeout, script=Path(__file__).resolve())
        results.append(record)
        if "error" in record:
            status = f"error: {record['error'].strip().splitlines()[-1:]}"
        else:
            rate = (
                f"{record['pairs_per_s']:.2f} pairs/s"
                if task == "rm"
                else f"{record['samples_per_s']:.2f} samples/s"
            )
            status = f"step {record['step_s']:.3f} s, {rate}, peak {record['peak_mb']:,.0f} MiB"
        print(
            f"[{i + 1}/{len(jobs)}] {shape} {task} {framework}: {status} ({record['wall_s']:.0f} s)",
            flush=True,
        )
        if out is None and "error" not in record:
            out = HERE / "results" / bench.device_slug(record)
        if out is not None:
            meta["wall_s"] = time.perf_counter() - start
            meta["device_name"] = next((r["device_name"] for r in results if "device_name" in r), "")
            write_outputs(out, meta, results)
    if out is None:
        raise SystemExit("every worker failed; nothing written")
    print(f"wrote {out}/race-trl.md, race-trl.json ({time.perf_counter() - start:.0f} s)")
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = bench._versions()
    for name in ("trl", "accelerate", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


# --------------------------------------------------------------------------------------- report
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def tables(results: list[dict]) -> list[str]:
    lines: list[str] = []
    ok = [r for r in results if "error" not in r]
    for shape, task in dict.fromkeys((r["shape"], r["task"]) for r in results):
        rows = {r["framework"]: r for r in ok if (r["shape"], r["task"]) == (shape, task)}
        cpu = all(r["device"] == "cpu" for r in rows.values())
        rate = "pairs_per_s" if task == "rm" else "samples_per_s"
        phases = [] if task == "rm" else list(PHASES)
        # (header, value of a record); the ratio row divides perlhf's by TRL's.
        columns: list[tuple[str, Callable[[dict], float]]] = [("step (s)", lambda r: r["step_s"])]
        if cpu:  # process CPU time: what a CPU shared with other work does not inflate
            columns.append(("step, CPU time (s)", lambda r: r["step_cpu_s"]))
        columns += [(p.replace("_", " "), lambda r, p=p: r["phases_s"][p]) for p in phases]
        columns += [
            (rate.replace("_per_s", "/s"), lambda r, k=rate: r[k]),
            ("peak (MiB)", lambda r: r["peak_mb"]),
        ]
        if cpu:
            columns.append(("peak − after imports (MiB)", lambda r: r["peak_mb"] - r["import_rss_mb"]))
        head = ["", "trainable params", *(name for name, _ in columns)]
        lines += [f"### {'Reward model' if task == 'rm' else 'RLOO'}, {shape}", ""]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for framework, r in sorted(rows.items()):
            cells = [framework.replace("trl", "TRL"), f"{r['trainable_params']:,}"]
            cells += [f"{value(r):,.3f}" if value(r) < 100 else f"{value(r):,.0f}" for _, value in columns]
            lines.append("| " + " | ".join(cells) + " |")
        if len(rows) == 2:
            ratios = [_ratio(value(rows["perlhf"]), value(rows["trl"])) for _, value in columns]
            lines.append("| **perlhf / TRL** | | " + " | ".join(ratios) + " |")
        for r in results:
            if (r["shape"], r["task"]) == (shape, task) and "error" in r:
                last = r["error"].strip().splitlines()[-1:] or ["?"]
                lines.append(f"\n**{r.get('framework', '?')} failed**: `{last[0][:200]}`")
        if cpu and rows:
            floors = ", ".join(
                f"{f.replace('trl', 'TRL')} {r['import_rss_mb']:,.0f}" for f, r in sorted(rows.items())
            )
            lines.append(f"\nRSS after imports (MiB): {floors}.")
        lines.append("")
    return lines


def render_markdown(meta: dict, results: list[dict]) -> str:
    opts = meta["options"]
    gpu = meta.get("device_name") if any(r.get("device", "").startswith("cuda") for r in results) else None
    shapes = "; ".join(f"`{name}` {s['params'] / 1e6:.1f}M params" for name, s in meta["shapes"].items())
    mem = (
        "`torch.cuda.max_memory_allocated`"
        if gpu
        else "peak RSS of the worker process, and its rise over the RSS once each framework's modules are "
        "imported (torch, transformers, peft, plus lightning + perlhf, or trl + datasets + accelerate)"
        + (
            "; `--live-memory`: glibc's mmap threshold fixed at 128 KiB in both workers, so that freed "
            "activations leave the RSS (`bench.LIVE_MEMORY_ENV`); steps are slower in this mode"
            if opts.get("live_memory")
            else ""
        )
    )
    rank, n = opts["rank"], opts["rl_prompts"] * opts["rl_samples"]
    lines = [
        "# perlhf vs TRL: the same job, time and memory",
        "",
        f"Command: `{meta['command']}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"Device: {gpu or 'CPU'}; CPU: {meta['cpu']}; torch threads: {opts['threads'] or 'default'}  ",
        f"Shapes (random weights): {shapes}  ",
        f"Run: {meta['started']}, {meta.get('wall_s', 0) / 60:.1f} min in all.",
        "",
        f"Both sides: LoRA r{rank} (alpha {2 * rank}, dropout {LORA_DROPOUT}) on the attention projections "
        f"(`perlhf.models.ATTENTION_TARGETS`), fp32 weights, precision `{opts['precision']}`, torch AdamW "
        f"(lr {LR}, weight decay {WEIGHT_DECAY}, constant), no gradient checkpointing, evaluation, saving or "
        f"logging. Medians over {opts['steps']} steps after {opts['warmup']} warm-up, each (task, framework) "
        f"in its own process; wall-clock times, plus the process's CPU time per step on CPU (robust when the "
        f"CPU is shared with other work). Memory: {mem}. Ratios below 1 favour perlhf.",
        "",
        f"- Reward model: pairwise, {opts['rm_pairs']} pairs × {opts['rm_length']} tokens per step, the same "
        "batches in the same order; dropout on (RewardModule trains in train mode; TRL's `disable_dropout` "
        "set to False to match); no gradient clipping. TRL `RewardTrainer` vs `RewardModule` + "
        "`lightning.Trainer`; step = optimiser step begin → end.",
        f"- RLOO: {opts['rl_prompts']} prompts × {opts['rl_samples']} samples = {n} per step, "
        f"{opts['prompt_length']}-token prompts, exactly {opts['new_tokens']} sampled tokens (EOS and "
        f"special tokens suppressed), minibatch {opts['minibatch']}, one optimiser step per rollout (one "
        f"epoch / `num_iterations=1`), KL β {KL_COEF} (k1, in the reward), clip {CLIP}, whitened advantages, "
        f"gradient-norm clip 1.0, no dropout; a frozen reward model of the same shape "
        f"({opts['reward_dtype']}); "
        "TRL `RLOOTrainer` (the reward model as `reward_funcs`, no vLLM) vs `PPOModule(algorithm='rloo')` + "
        "`RolloutDataModule`. Step = wall time between consecutive step ends; phases (wall-clock medians, "
        "so they need not add up): generate, score (reward model), old log-probs and reference (no-grad "
        "passes), update (forward, backward, optimiser step), other (tokenise/decode, advantages, logging).",
        "",
        *tables(results),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta: dict, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "race-trl.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "race-trl.md").write_text(render_markdown(meta, results))


if __name__ == "__main__":
    main()
