"""Memory and time of the RL update's log-prob head: perlhf's chunked kernel vs the plain formula.

    python benchmarks/logprobs_memory.py            # CPU; on a GPU it uses the GPU
    python benchmarks/logprobs_memory.py --rows 1024 --vocabs 49152 151936

One minibatch's token log-probs, forward and backward, from bf16 logits (what the policy's head
yields under ``bf16-mixed``) at temperature 0.7:

- ``plain``: ``z = logits.float() / t``; ``z[label] - logsumexp(z)`` (autograd keeps float32 ``z``);
- ``perlhf``: ``perlhf.losses.logprobs_from_logits`` (keeps the bf16 logits and one float per row;
  float32 only a chunk of rows at a time).

Each (variant, vocabulary) runs in its own process. Memory on CPU is the peak RSS above the
process's level just before the call, with glibc's mmap threshold fixed at 128 KiB so that freed
tensors leave the process (the peak then tracks live tensors); on a GPU it is
``torch.cuda.max_memory_allocated`` above the level before the call. The logits themselves and
their gradient are counted in both. Writes ``results/<device>/logprobs-memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "perlhf")


def worker(variant: str, rows: int, vocab: int, repeats: int) -> dict:
    import resource

    import torch

    from perlhf.losses import logprobs_from_logits

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, vocab, (1, rows), device=device, generator=gen)
    weights = torch.randn(1, rows, device=device, generator=gen)

    def once() -> None:
        logits = torch.randn(1, rows, vocab, device=device, generator=gen, dtype=torch.bfloat16)
        logits.requires_grad_(True)
        if variant == "plain":
            z = logits.float() / 0.7
            out = z.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
        else:
            out = logprobs_from_logits(logits, labels, 0.7)
        (out * weights).sum().backward()
        assert logits.grad is not None

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "variant": variant,
        "rows": rows,
        "vocab": vocab,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_mib": peak / 2**20,
        "logits_mib": rows * vocab * 2 / 2**20,
        "seconds": sorted(times)[len(times) // 2],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens per minibatch (16 x 64 by default)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="default: benchmarks/results/<cpu|cuda>/logprobs-memory")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant, rows, vocab, repeats = args.worker
        print(json.dumps(worker(variant, int(rows), int(vocab), int(repeats))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    results = []
    for vocab in args.vocabs:
        for variant in VARIANTS:
            sizes = [str(args.rows), str(vocab), str(args.repeats)]
            cmd = [sys.executable, __file__, "--worker", variant, *sizes]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    device = results[0]["device"]
    out = Path(args.out or f"benchmarks/results/{'cpu' if device == 'cpu' else 'cuda'}/logprobs-memory")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/logprobs_memory.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Token log-probs, forward + backward, from bf16 logits",
        "",
        f"`{command}`",
        f"on {device} ({platform.processor() or platform.machine()}); {args.rows} rows, temperature 0.7, "
        f"median of {args.repeats}. Memory: peak above the level before the call (the bf16 logits and "
        "their bf16 gradient are in it).",
        "",
        "| vocabulary | bf16 logits (MiB) | plain: peak (MiB), time (s) | perlhf: peak (MiB), time (s) "
        "| peak perlhf / plain |",
        "|---|---|---|---|---|",
    ]
    for vocab in args.vocabs:
        plain, ours = (next(r for r in results if (r["vocab"], r["variant"]) == (vocab, v)) for v in VARIANTS)
        lines.append(
            f"| {vocab:,} | {plain['logits_mib']:,.0f} | {plain['peak_mib']:,.0f}, {plain['seconds']:.3f} "
            f"| {ours['peak_mib']:,.0f}, {ours['seconds']:.3f} | {ours['peak_mib'] / plain['peak_mib']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
