"""Where a reward-model step spends its time and memory: full fine-tuning vs LoRA, side by side.

    python benchmarks/profile_step.py                      # gpt2-small, 4 pairs x 256 tokens
    python benchmarks/profile_step.py --settings full,lora-r8,lora-r8+nodrop --threads 1

For each setting, in its own process: the step split into forward, backward and optimiser step
(median of ``--steps`` after one warm-up), the tensors autograd saves for the backward pass
(activations; parameters excluded) grouped by shape, and ``torch.profiler``'s top operators by
self CPU (or CUDA) time. The same backbones, batches and LoRA settings as ``bench.py``'s ``rm``
task. ``+nodrop`` sets ``ModelConfig.disable_dropout``. Writes ``results/<device>/profile-rm.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def _setting(text: str) -> tuple[Any, bool]:
    nodrop = text.endswith("+nodrop")
    return bench.parse_setting(text.removesuffix("+nodrop")), nodrop


def run(spec: dict) -> dict:
    """Profile one setting in this process."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from perlhf.modules import RewardModule

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    setting, nodrop = _setting(spec["setting"])
    device = torch.device("cuda" if torch.cuda.is_available() and not spec["cpu"] else "cpu")
    config = bench._model_config(spec, setting)
    config.disable_dropout = nodrop
    module = RewardModule(config)
    module.configure_model()
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batches = bench.rm_batches(spec)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch: dict) -> dict[str, float]:
        times = {}
        t0 = time.perf_counter()
        rewards = module(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        sync()
        times["forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss.backward()
        sync()
        times["backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times["optimizer"] = time.perf_counter() - t0
        return times

    step(batches[0])  # warm-up
    timings = [step(batch) for batch in batches[1 : 1 + spec["steps"]]]

    # Saved activations: storages autograd keeps for backward, parameters (and views of them) excluded.
    param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}
    by_shape: Counter = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            by_shape[f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"] += seen[ptr]
        return t

    batch = batches[-1]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rewards = module(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    del rewards

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return {
        "setting": spec["setting"],
        "phases_s": {k: statistics.median(t[k] for t in timings) for k in timings[0]},
        "saved_mb": sum(seen.values()) / 2**20,
        "saved_by_shape_mb": {k: v / 2**20 for k, v in by_shape.most_common(8)},
        "top_ops": [
            {"op": e.key, "share": getattr(e, key) / total, "ms": getattr(e, key) / 1e3, "calls": e.count}
            for e in events[:12]
        ],
        "trainable_params": sum(p.numel() for p in params),
    }


def render(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Reward-model step profile: full fine-tuning vs LoRA",
        "",
        f"Command: `{meta['command']}`  ",
        f"Versions: {meta['versions']}  ",
        f"Device: {meta['device']}; batch {meta['pairs']} pairs x {meta['length']} tokens; "
        f"shape `{meta['shape']}`; medians of {meta['steps']} steps after 1 warm-up.",
        "",
        "| setting | trainable | forward (s) | backward (s) | optimiser (s) | step (s) | saved activations (MiB) |",  # noqa: E501
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r["phases_s"]
        lines.append(
            f"| {r['setting']} | {r['trainable_params']:,} | {p['forward']:.3f} | {p['backward']:.3f} | "
            f"{p['optimizer']:.3f} | {sum(p.values()):.3f} | {r['saved_mb']:,.0f} |"
        )
    for r in results:
        lines += ["", f"## {r['setting']}", "", "Saved activations by shape (MiB):", ""]
        lines += [f"- `{k}`: {v:,.0f}" for k, v in r["saved_by_shape_mb"].items()]
        lines += ["", "| operator | share of self time | ms | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['share']:.1%} | {o['ms']:,.1f} | {o['calls']} |" for o in r["top_ops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2-small", help=", ".join(bench.SHAPES))
    p.add_argument("--settings", default="full,lora-r8,full+nodrop,lora-r8+nodrop")
    p.add_argument("--rm-pairs", type=int, default=4)
    p.add_argument("--rm-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--cache-dir", default=os.environ.get("PERLHF_BENCH_CACHE", "~/.cache/perlhf/bench"))
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(run(spec)))
        return

    info = bench.ensure_backbones(args.shape, Path(args.cache_dir).expanduser())
    results = []
    for setting in args.settings.split(","):
        spec = {
            "setting": setting,
            "shape": args.shape,
            "policy": info["policy"],
            "tokenizer": info["tokenizer"],
            "rm_pairs": args.rm_pairs,
            "rm_length": args.rm_length,
            "warmup": 1,
            "steps": args.steps,
            "threads": args.threads,
            "cpu": args.cpu,
        }
        work = Path(args.cache_dir).expanduser() / "profile"
        work.mkdir(parents=True, exist_ok=True)
        spec["result"] = str(work / "result.json")
        (work / "spec.json").write_text(json.dumps(spec))
        subprocess.run([sys.executable, __file__, "--worker", str(work / "spec.json")], check=True)
        results.append(json.loads(Path(spec["result"]).read_text()))
        print(f"{setting}: {results[-1]['phases_s']}, saved {results[-1]['saved_mb']:.0f} MiB", flush=True)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.cuda.get_device_name() if gpu else f"CPU ({bench.cpu_model()})"
    meta = {
        "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": ", ".join(f"{k} {v}" for k, v in bench._versions().items()),
        "device": device + (f", {args.threads} thread(s)" if args.threads else ""),
        "pairs": args.rm_pairs,
        "length": args.rm_length,
        "shape": args.shape,
        "steps": args.steps,
    }
    slug = bench.device_slug({"device": "cuda" if gpu else "cpu", "device_name": device})
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / slug
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-rm.md").write_text(render(meta, results))
    print(f"wrote {out / 'profile-rm.md'}")


if __name__ == "__main__":
    main()
