"""Timing and memory probes of the benchmark workers: per-phase clocks, a per-batch step timer,
a recompute counter for gradient checkpointing, peak memory, and what the machine is (see
``bench.py``)."""

from __future__ import annotations

import contextlib
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------------------- worker
class PhaseClock:
    """Per-step phase timings: ``add(name, seconds)`` into the current step, ``close()`` per step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, fn: Callable, name: str, when: Callable[[], bool] | None = None) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if when is not None and not when():
                return fn(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.add(name, time.perf_counter() - start)
            return out

        return timed

    def close(self, **extra: float) -> None:
        self.steps.append({**self.current, **extra})
        self.current = {}


def _step_timer(clock: PhaseClock, on_start: Callable[[Any, Any], None]) -> Any:
    import lightning.pytorch as L

    class StepTimer(L.Callback):
        """``batch_s``: training batch start → end; ``interval_s``: previous batch end → this end
        (includes fetching the batch, i.e. the rollout for RL); ``cpu_batch_s`` / ``cpu_interval_s``:
        the same spans in this process's CPU time, which a CPU shared with other work does not
        inflate (with one torch thread it is the work itself)."""

        def on_train_start(self, trainer: Any, module: Any) -> None:
            on_start(trainer, module)

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            clock.sync()
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            clock.sync()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
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


def count_recomputes(module: Any) -> Callable[[], int]:
    """Count forward calls of the first transformer block's submodules that run inside a backward
    pass, i.e. activation-checkpointing recomputations; returns a reader of the count. A ``+ckpt``
    setting whose count stays 0 did not actually checkpoint (e.g. a block left in eval mode).
    (The block itself is recomputed through ``forward``, bypassing its own hooks.)"""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = next((m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)), None)
    count = [0]

    def hook(*_: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            count[0] += 1

    for child in layer.children() if layer is not None else []:
        child.register_forward_pre_hook(hook)
    return lambda: count[0]


def _memory(device: Any) -> dict[str, float]:
    import torch

    from perlhf.utils import peak_memory_mb

    out = {"peak_rss_mb": peak_memory_mb(torch.device("cpu"))}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    out["peak_mb"] = out.get("peak_cuda_mb", out["peak_rss_mb"])
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "lightning"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_slug(record: dict) -> str:
    """``cpu``, or ``cuda-h100`` from a GPU name like ``NVIDIA H100 80GB HBM3``."""
    if not record.get("device", "cpu").startswith("cuda"):
        return "cpu"
    words = re.sub(r"^(NVIDIA|Tesla|GeForce|RTX)\s+", "", record.get("device_name", "")).split()
    return "cuda-" + (re.sub(r"[^a-z0-9]+", "", words[0].lower()) if words else "gpu")


def rl_step_record(
    clock: PhaseClock, warmup: int, phases: tuple[str, ...], samples: int, new_tokens: int
) -> dict:
    """The timing fields of an RL worker's record from ``clock``'s steps after ``warmup``: median
    step and CPU time, median per phase (``phases[-1]``, "other", is the step's unaccounted rest),
    samples/s."""
    for step in clock.steps:
        step[phases[-1]] = step["interval_s"] - sum(step.get(p, 0.0) for p in phases[:-1])
    steps = clock.steps[warmup:]
    step_s = statistics.median(s["interval_s"] for s in steps)
    return {
        "steps": len(steps),
        "warmup": warmup,
        "step_s": step_s,
        "step_times_s": [s["interval_s"] for s in clock.steps],
        "step_cpu_s": statistics.median(s["cpu_interval_s"] for s in steps),
        "phases_s": {p: statistics.median(s.get(p, 0.0) for s in steps) for p in phases},
        "phase_steps": clock.steps,
        "samples_per_step": samples,
        "samples_per_s": samples / step_s,
        "response_tokens": new_tokens,
    }
