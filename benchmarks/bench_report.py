"""The benchmark's report: tables against the baseline and full fine-tuning, markdown, JSON
and a chart (see ``bench.py``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from bench_jobs import RL_PHASES


# --------------------------------------------------------------------------------------- report
def _baseline_for(results: list[dict], record: dict) -> dict | None:
    dtype = "bfloat16" if record.get("precision") == "bf16-true" else "float32"
    for r in results:
        if (
            r.get("finetune") == "baseline"
            and "error" not in r
            and (r["shape"], r["task"]) == (record["shape"], record["task"])
            and ("bfloat16" if r["precision"] == "bf16-true" else "float32") == dtype
        ):
            return r
    return None


def _full_for(results: list[dict], record: dict) -> dict | None:
    """The full fine-tuning record to compare with: same ckpt and precision if measured, else any."""
    fulls = [
        r
        for r in results
        if r.get("finetune") == "full"
        and "error" not in r
        and (r["shape"], r["task"]) == (record["shape"], record["task"])
    ]
    same = [
        r for r in fulls if (r["grad_ckpt"], r["precision"]) == (record["grad_ckpt"], record["precision"])
    ]
    return (same or fulls or [None])[0]


def _same_variant(a: dict, b: dict | None) -> bool:
    return b is not None and (a["grad_ckpt"], a["precision"]) == (b["grad_ckpt"], b["precision"])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def _increment(results: list[dict], r: dict) -> float | None:
    base = _baseline_for(results, r)
    return r["peak_mb"] - base["peak_mb"] if base else None


def tables(meta: dict, results: list[dict]) -> list[str]:
    lines: list[str] = []
    ok = [r for r in results if "error" not in r]
    for shape in dict.fromkeys(r["shape"] for r in results):
        for task in dict.fromkeys(r["task"] for r in results if r["shape"] == shape):
            rows = [r for r in ok if (r["shape"], r["task"]) == (shape, task) and r["finetune"] != "baseline"]
            bases = [
                r for r in ok if (r["shape"], r["task"]) == (shape, task) and r["finetune"] == "baseline"
            ]
            errors = [r for r in results if (r["shape"], r["task"]) == (shape, task) and "error" in r]
            title = "Reward model" if task == "rm" else f"RL ({task})"
            lines += [f"### {title}, {shape}", ""]
            if task == "rm":
                head = "| setting | ckpt | precision | trainable params | step (s) | tokens/s "
                sep = "|---|---|---|---:|---:|---:"
            else:
                phases = " | ".join(p.replace("_", " ") for p in RL_PHASES)
                head = f"| setting | ckpt | precision | trainable params | step (s) | {phases} | samples/s "
                sep = "|---|---|---|---:|---:|" + "---:|" * len(RL_PHASES) + "---:"
            head += "| peak (MiB) | peak − baseline (MiB) | time / full | peak / full "
            head += "| (peak − baseline) / full |"
            sep += "|---:|---:|---:|---:|---:|"
            lines += [head, sep]
            marked = ""
            for r in rows:
                full = _full_for(ok, r)
                inc = _increment(ok, r)
                ckpt = "no"
                if r["grad_ckpt"]:
                    ckpt = "yes" if r.get("backward_recomputes") else "**on, no recompute**"
                cells = [r["setting"], ckpt, r["precision"], f"{r['trainable_params']:,}"]
                cells.append(f"{r['step_s']:.3f}")
                if task == "rm":
                    cells.append(f"{r['tokens_per_s']:,.0f}")
                else:
                    cells += [f"{r['phases_s'][p]:.3f}" for p in RL_PHASES]
                    cells.append(f"{r['samples_per_s']:.2f}")
                cells += [f"{r['peak_mb']:,.0f}", "–" if inc is None else f"{inc:,.0f}"]
                mark = "" if full is None or _same_variant(r, full) else "*"
                marked = mark or marked
                cells.append(_ratio(r["step_s"], full and full["step_s"]) + mark)
                cells.append(_ratio(r["peak_mb"], full and full["peak_mb"]) + mark)
                cells.append(_ratio(inc, full and _increment(ok, full)) + mark)
                lines.append("| " + " | ".join(cells) + " |")
            if marked:
                lines.append(
                    "\n\\* against `full` with other memory features (no `full` run with the same "
                    "checkpointing and precision)."
                )
            for b in bases:
                lines.append(
                    f"\nMemory floor (`{b['setting']}`: imports + frozen backbone"
                    f"{'' if task == 'rm' else ' + reward model'}, no training): {b['peak_mb']:,.0f} MiB."
                )
            for e in errors:
                last = e["error"].strip().splitlines()[-1:] or ["?"]
                lines.append(f"\n**{e['setting']} failed**: `{last[0][:200]}`")
            lines.append("")
    return lines


def write_outputs(out: Path, meta: dict, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "bench.md").write_text(render_markdown(meta, results))
    with contextlib.suppress(Exception):  # the plot is a convenience; the tables are the record
        plot(results, out / "bench.png")


def render_markdown(meta: dict, results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    threads = sorted({r["threads"] for r in ok})
    gpu = meta.get("device_name") if any(r["device"].startswith("cuda") for r in ok) else None
    opts = meta["options"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    shapes = "; ".join(
        f"`{name}` {spec['params'] / 1e6:.1f}M params" for name, spec in meta["shapes"].items()
    )
    mem = (
        "`torch.cuda.max_memory_allocated` (weights, gradients, optimiser state, activations)"
        if gpu
        else "peak RSS of the worker process (includes the Python/torch runtime: see the baseline rows)"
        + (
            "; `--live-memory`: glibc's mmap threshold fixed at 128 KiB, so that freed activations "
            "leave the RSS (`bench.LIVE_MEMORY_ENV`); steps are slower in this mode"
            if meta.get("live_memory")
            else "; glibc's default allocator, whose freed heap stays resident: `--live-memory` "
            "measures live tensors instead"
        )
    )
    lines = [
        "# Full fine-tuning vs LoRA: time and memory",
        "",
        f"Command: `{meta['command']}`  ",
        f"Versions: {versions}  ",
        f"Device: {gpu or 'CPU'}; CPU: {meta['cpu']}; torch threads per worker: {threads}  ",
        f"Shapes (random weights): {shapes}  ",
        f"Run: {meta['started']}, {meta.get('wall_s', 0) / 60:.1f} min in all.",
        "",
        f"Each (setting, task) runs in its own process through `lightning.Trainer.fit`; medians over "
        f"{opts['steps']} steps after {opts['warmup']} warm-up. Memory: {mem}. LoRA alpha = 2·rank on "
        "the attention projections; full fine-tuning trains every weight, and full RL keeps a frozen "
        "reference copy and a separate critic (the PPOModule defaults), LoRA RL one backbone with "
        "`policy` and `value` adapters. Optimiser: AdamW.",
        "",
        f"- Reward model: pairwise, {opts['rm_pairs']} pairs × {opts['rm_length']} tokens per step; step = "
        "`on_train_batch_start` → `on_train_batch_end` (forward, backward, optimiser step, metric updates).",
        f"- RL: {opts['rl_prompts']} prompts × {opts['rl_samples']} sample(s), {opts['prompt_length']}-token "
        f"prompts, exactly {opts['new_tokens']} sampled tokens (EOS off), minibatch {opts['minibatch']}, "
        f"epochs {opts['ppo_epochs'] or 'ppo 4 / reinforce 1'}; frozen reward model of the same shape "
        f"({opts['reward_dtype']}). Step = wall time between consecutive `on_train_batch_end` "
        "(rollout + update); phases in seconds (medians, so they need not add up exactly): generate, "
        "score (reward model), rollout other (decode, re-tokenise), old log-probs + values and "
        "reference (no-grad passes), update (all epochs' forward/backward/optimiser steps), other.",
        "",
        *tables(meta, results),
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r and r["finetune"] != "baseline"]
    groups = list(dict.fromkeys((r["shape"], r["task"]) for r in ok))
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for row, (shape, task) in enumerate(groups):
        rows = [r for r in ok if (r["shape"], r["task"]) == (shape, task)]
        labels = [r["setting"] for r in rows]
        x = range(len(rows))
        ax = axes[row][0]
        if task == "rm":
            ax.bar(x, [r["step_s"] for r in rows], color=colours[0])
        else:
            bottom = [0.0] * len(rows)
            for i, phase in enumerate(RL_PHASES):
                values = [max(r["phases_s"][phase], 0.0) for r in rows]
                ax.bar(x, values, bottom=bottom, color=colours[i % 10], label=phase.replace("_", " "))
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
            ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{shape} {task}: step time (s, median)", fontsize=9)
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
        ax = axes[row][1]
        ax.bar(x, [r["peak_mb"] for r in rows], color=colours[1])
        base = _baseline_for(results, rows[0])
        if base:
            ax.axhline(base["peak_mb"], color="k", ls="--", lw=1, label="baseline (no training)")
            ax.legend(fontsize=6)
        ax.set_title(f"{shape} {task}: peak memory (MiB)", fontsize=9)
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
