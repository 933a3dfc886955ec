"""Full fine-tuning vs LoRA on the same job: step time, throughput and peak memory.

    python benchmarks/bench.py                                   # device defaults (see --help)
    python benchmarks/bench.py --settings full,lora-r8,lora-r8+ckpt,lora-r8+ckpt+bf16-true
    python benchmarks/bench.py --shapes tiny --tasks rm,reinforce --steps 2 --warmup 1

Backbones are built from configs with random weights (``gpt2-small``: GPT-2 124M;
``qwen2-0.5b``: Qwen2-0.5B's shape; ``tiny`` / ``tiny-qwen2`` for tests), saved once in
``from_pretrained`` layout under ``--cache-dir`` with a word-level tokenizer whose vocabulary is the
model's own (``w3 w4 …``), so every sampled token decodes to one word and re-encodes to the same id:
prompts, responses and reward-model inputs have the same length for every setting.

Tasks, each (setting, task) in its own worker subprocess (``--worker SPEC --result OUT``), so peak
memory never mixes:

- ``rm``: ``RewardModule`` (pairwise) fitted by a real ``lightning.Trainer`` on fixed random
  batches (identical for every setting); a callback times each training batch (forward, backward,
  optimiser step; CUDA synchronised) from ``on_train_batch_start`` to ``on_train_batch_end``.
- ``ppo`` / ``reinforce``: ``PPOModule`` + ``RolloutDataModule`` fitted by a ``Trainer``; the
  reward model that scores rollouts is a frozen sequence classifier of the same shape, built once
  and identical for every setting. The RL step is the wall time between consecutive
  ``on_train_batch_end`` calls (rollout + training step); its phases are timed from outside by
  wrapping the module's methods on the instance (perlhf itself is untouched): generation and
  scoring (``rollout/generate_s``, ``rollout/score_s`` of the batch), the rest of the rollout
  (decode, re-tokenise), old log-probs + values (``_forward`` under no_grad), reference log-probs
  (``reference_logprobs``), the update (``_update``), and "other" (advantages, logging, Lightning).

Settings: ``full`` or ``lora-r<rank>`` (alpha = 2·rank), optionally suffixed with ``+ckpt``
(gradient checkpointing) and ``+<precision>`` (``32-true``, ``bf16-mixed``, ``bf16-true``); a
``baseline`` worker per task (imports + the frozen backbone(s) loaded, no training) gives the
memory floor. ``--grad-ckpt`` / ``--precision`` set the default for settings without a suffix.

Writes ``benchmarks/results/<device>/bench.{md,json,png}`` (``cpu``, or ``cuda-h100`` etc.).

This file is the driver (arguments, one subprocess per worker, the JSON record). The rest reads
on its own: ``bench_shapes.py`` (backbones, settings, defaults), ``bench_timing.py`` (phase
clocks, peak memory, the machine), ``bench_jobs.py`` (the baseline, ``rm`` and RL workers) and
``bench_report.py`` (tables, markdown, chart). Other benchmarks import all of them through
``bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules, also when loaded by path

from bench_jobs import (  # noqa: E402
    RL_PHASES,
    _model_config,
    rl_prompts,
    rm_batches,
    run_worker,
)
from bench_report import render_markdown, tables, write_outputs  # noqa: E402
from bench_shapes import (  # noqa: E402
    DEFAULT_SETTINGS,
    DEFAULTS,
    HERE,
    PRECISIONS,
    SHAPES,
    SPECIAL_IDS,
    TASKS,
    Setting,
    ensure_backbones,
    parse_setting,
)
from bench_timing import (  # noqa: E402
    PhaseClock,
    _memory,
    _step_timer,
    _versions,
    cpu_model,
    device_slug,
    rl_step_record,
)

__all__ = [
    "DEFAULTS",
    "LIVE_MEMORY_ENV",
    "RL_PHASES",
    "SHAPES",
    "SPECIAL_IDS",
    "PhaseClock",
    "Setting",
    "_memory",
    "_model_config",
    "_step_timer",
    "_versions",
    "add_run_args",
    "cpu_model",
    "device_slug",
    "ensure_backbones",
    "parse_setting",
    "render_markdown",
    "resolve_run",
    "rl_prompts",
    "rl_step_record",
    "rm_batches",
    "run_subprocess",
    "run_worker",
    "tables",
    "write_outputs",
]

LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""``--live-memory``: on CPU, make peak RSS track live tensors. glibc raises its mmap threshold
after large frees, so later activations come from the heap, and the freed, fragmented heap stays
resident: a LoRA reward-model step on gpt2-small peaked at 5,120 MiB RSS in its first step and
6,373 MiB by its third, against 3,797-3,850 MiB with the threshold fixed at 128 KiB (every larger
tensor mapped on its own and returned on free). The price is a page fault per fresh tensor, which
slows CPU steps (that LoRA step: 5.1 s -> 8.8 s), so time and live memory come from separate runs.
No effect on CUDA memory."""


def worker_env(live_memory: bool = False) -> dict[str, str]:
    """The worker's environment (``LIVE_MEMORY_ENV`` added with ``live_memory``)."""
    return {**LIVE_MEMORY_ENV, **os.environ} if live_memory else dict(os.environ)


def run_subprocess(spec: dict, timeout: float, script: Path | None = None) -> dict:
    """Run one worker of ``script`` (default: this file) in a fresh Python process, as
    ``script --worker SPEC --result OUT``; a failure becomes a record with ``error``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [
            sys.executable,
            str(script or Path(__file__).resolve()),
            "--worker",
            str(spec_path),
            "--result",
            str(result_path),
        ]
        start = time.perf_counter()
        try:
            env = worker_env(spec.get("live_memory", False))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            failed = proc.returncode != 0 or not result_path.exists()
            tail = (proc.stderr or proc.stdout)[-2000:]
        except subprocess.TimeoutExpired:
            failed, tail = True, f"timed out after {timeout:.0f} s"
        if failed:
            keys = ("task", "shape", "setting", "framework")
            return {
                **{k: spec[k] for k in keys if k in spec},
                "error": tail,
                "wall_s": time.perf_counter() - start,
            }
        record = json.loads(result_path.read_text())
        record["wall_s"] = time.perf_counter() - start
        return record


RUN_OPTIONS: dict[str, tuple[type, str]] = {
    "steps": (int, "measured steps per worker"),
    "warmup": (int, "steps run before measuring"),
    "rm_pairs": (int, "RM batch: preference pairs"),
    "rm_length": (int, "RM tokens per sequence"),
    "rl_prompts": (int, "RL prompts per step"),
    "rl_samples": (int, "RL samples per prompt"),
    "prompt_length": (int, "RL prompt tokens"),
    "new_tokens": (int, "RL response tokens, exact"),
    "minibatch": (int, "RL sequences per forward/backward"),
}
"""Sizing options that ``bench.py`` and ``race_trl.py`` share (their defaults: each ``DEFAULTS``)."""


def add_run_args(p: argparse.ArgumentParser, defaults: dict[str, dict[str, Any]], tasks: tuple) -> None:
    """The command-line options both benchmark drivers take; help shows ``defaults`` per device."""

    def per_device(key: str) -> str:
        cpu, gpu = defaults["cpu"][key], defaults["cuda"][key]
        return f"(cpu {cpu}, gpu {gpu})" if cpu != gpu else f"({cpu})"

    p.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} {per_device('shapes')}")
    p.add_argument("--tasks", default=",".join(tasks), help="comma list of " + ", ".join(tasks))
    for key, (kind, text) in RUN_OPTIONS.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{text} {per_device(key)}")
    p.add_argument(
        "--reward-dtype",
        choices=["float32", "bfloat16"],
        help=f"RL reward model {per_device('reward_dtype')}",
    )
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is available")
    p.add_argument(
        "--live-memory",
        action="store_true",
        help="CPU: fix glibc's mmap threshold so peak RSS tracks live tensors (slower steps)",
    )
    p.add_argument("--cache-dir", default=os.environ.get("PERLHF_BENCH_CACHE", "~/.cache/perlhf/bench"))
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)


def resolve_run(
    args: argparse.Namespace, defaults: dict[str, dict[str, Any]], tasks: tuple
) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """``(device, options, shapes, tasks)``: the device's defaults under the flags given; exits
    on an unknown shape or task."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    opts = {
        key: default if getattr(args, key, None) is None else getattr(args, key)
        for key, default in defaults[device].items()
    }
    shapes = [x.strip() for x in opts.pop("shapes").split(",") if x.strip()]
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [x for x in shapes if x not in SHAPES] + [t for t in wanted if t not in tasks]
    if unknown:
        raise SystemExit(f"unknown shapes/tasks: {unknown}; shapes: {list(SHAPES)}, tasks: {list(tasks)}")
    return device, opts, shapes, wanted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_run_args(p, DEFAULTS, TASKS)
    p.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="comma list: full, lora-r<k>, each +ckpt/+<precision>"
    )
    p.add_argument(
        "--grad-ckpt", action="store_true", help="gradient checkpointing for settings without +ckpt"
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, help="Trainer precision (cpu: 32-true; gpu: bf16-mixed)"
    )
    p.add_argument("--ppo-epochs", type=int, help="RL passes per batch (ppo 4, reinforce 1)")
    p.add_argument("--no-baseline", action="store_true", help="skip the memory-floor workers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        record = run_worker(json.loads(Path(args.worker).read_text()))
        Path(args.result).write_text(json.dumps(record, indent=1))
        return
    device, opts, shapes, tasks = resolve_run(args, DEFAULTS, TASKS)
    settings = [
        parse_setting(s, args.grad_ckpt, opts["precision"]) for s in args.settings.split(",") if s.strip()
    ]
    jobs = []
    for shape in shapes:
        for task in tasks:
            dtypes = dict.fromkeys(s.load_dtype for s in settings)
            if not args.no_baseline:
                for dtype in dtypes:
                    if dtype == "bfloat16":
                        label = "baseline+bf16-true"
                    else:  # weights in fp32, whatever the default precision is
                        label = "baseline" + ("+32-true" if opts["precision"] == "bf16-true" else "")
                    jobs.append((shape, task, label))
            jobs += [(shape, task, s.label) for s in settings]
    command = "python benchmarks/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "versions": _versions(),
        "cpu": cpu_model(),
        "options": {**opts, "ppo_epochs": args.ppo_epochs, "threads": args.threads, "seed": args.seed},
        "shapes": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "live_memory": args.live_memory,
    }
    results: list[dict] = []
    infos: dict[str, dict] = {}
    out = Path(args.out) if args.out else None
    start = time.perf_counter()
    for i, (shape, task, label) in enumerate(jobs):
        if shape not in infos:
            infos[shape] = ensure_backbones(shape, Path(args.cache_dir).expanduser(), args.seed)
            meta["shapes"][shape] = {**SHAPES[shape], "params": infos[shape]["params"]}
        spec = {
            **opts,
            "shape": shape,
            "task": task,
            "setting": label,
            "device": device,
            "grad_ckpt": args.grad_ckpt,
            "ppo_epochs": args.ppo_epochs,
            "threads": args.threads,
            "seed": args.seed,
            "live_memory": args.live_memory,
            "policy": infos[shape]["policy"],
            "tokenizer": infos[shape]["tokenizer"],
            "reward": infos[shape]["reward"],
            "reward_base": infos[shape]["reward_base"],
        }
        record = run_subprocess(spec, args.timeout)
        results.append(record)
        status = (
            f"error: {record['error'].strip().splitlines()[-1:]}" if "error" in record else _brief(record)
        )
        print(
            f"[{i + 1}/{len(jobs)}] {shape} {task} {label}: {status} ({record['wall_s']:.0f} s)", flush=True
        )
        if out is None and "error" not in record:
            out = HERE / "results" / device_slug(record)
        if out is not None:
            meta["wall_s"] = time.perf_counter() - start
            meta["device_name"] = next((r["device_name"] for r in results if "device_name" in r), "")
            write_outputs(out, meta, results)
    if out is None:
        raise SystemExit("every worker failed; nothing written")
    print(f"wrote {out}/bench.md, bench.json, bench.png ({time.perf_counter() - start:.0f} s)")


def _brief(record: dict) -> str:
    if record["finetune"] == "baseline":
        return f"peak {record['peak_mb']:.0f} MiB"
    rate = (
        f"{record['tokens_per_s']:.0f} tok/s"
        if record["task"] == "rm"
        else f"{record['samples_per_s']:.2f} samples/s"
    )
    return f"step {record['step_s']:.3f} s, {rate}, peak {record['peak_mb']:.0f} MiB"


if __name__ == "__main__":
    main()
