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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
RL_TASKS = ("ppo", "reinforce")
TASKS = ("rm", *RL_TASKS)
DEFAULT_SETTINGS = "full,lora-r1,lora-r4,lora-r8,lora-r16,lora-r32"
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
SPECIAL_IDS = (0, 1, 2)  # EOS, PAD, UNK: never in data, suppressed in generation

# Backbone shapes (random weights). ``params`` is filled in when a shape is built.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1024, "n_positions": 512},
    "tiny-qwen2": {
        "arch": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
    },
    "gpt2-small": {
        "arch": "gpt2",
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "vocab_size": 50257,
        "n_positions": 1024,
    },
    "qwen2-0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
    },
}

# Defaults per device. GPU: the shape of the repo's Qwen recipes (configs/tldr: RM batch 8 pairs,
# RL 128 episodes per batch, minibatch 16, ~53 new tokens, bf16-mixed, reward model in bf16).
DEFAULTS = {
    "cpu": {
        "shapes": "gpt2-small",
        "precision": "32-true",
        "rm_pairs": 4,
        "rm_length": 256,
        "rl_prompts": 8,
        "rl_samples": 1,
        "prompt_length": 64,
        "new_tokens": 32,
        "minibatch": 16,
        "steps": 3,
        "warmup": 1,
        "reward_dtype": "float32",
    },
    "cuda": {
        "shapes": "gpt2-small,qwen2-0.5b",
        "precision": "bf16-mixed",
        "rm_pairs": 8,
        "rm_length": 512,
        "rl_prompts": 128,
        "rl_samples": 1,
        "prompt_length": 64,
        "new_tokens": 64,
        "minibatch": 16,
        "steps": 5,
        "warmup": 2,
        "reward_dtype": "bfloat16",
    },
}


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One column of the comparison: what trains, and the memory features."""

    label: str
    finetune: str  # "lora", "full", or "baseline" (no training)
    rank: int | None
    ckpt: bool
    precision: str

    @property
    def load_dtype(self) -> str:
        """``ModelConfig.dtype``: weights in bf16 under ``bf16-true``, else fp32 (mixed keeps fp32)."""
        return "bfloat16" if self.precision == "bf16-true" else "float32"


def parse_setting(text: str, grad_ckpt: bool = False, precision: str = "32-true") -> Setting:
    """``full``, ``lora-r8``, ``baseline``, each optionally ``+ckpt`` and/or ``+<precision>``."""
    head, *suffixes = text.strip().split("+")
    ckpt = grad_ckpt
    for suffix in suffixes:
        if suffix == "ckpt":
            ckpt = True
        elif suffix in PRECISIONS:
            precision = suffix
        else:
            raise ValueError(f"setting {text!r}: unknown suffix {suffix!r} (ckpt or one of {PRECISIONS})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if head in ("full", "baseline"):
        return Setting(text.strip(), head, None, ckpt, precision)
    match = re.fullmatch(r"lora-r(\d+)", head)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"setting {text!r}: expected full, lora-r<rank> or baseline")
    return Setting(text.strip(), "lora", int(match.group(1)), ckpt, precision)


# --------------------------------------------------------------------------------------- backbones
def build_tokenizer(vocab_size: int) -> Any:
    """Word-level tokenizer over the model's whole vocabulary: id ``i`` ≥ 3 is the word ``w<i>``,
    0/1/2 are EOS/PAD/UNK; no special tokens are added on encoding. Decoding joins words with
    spaces, so sampled ids round-trip exactly through text (the reward model re-tokenises)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1, UNK: 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=2**20,
    )


def model_config(shape: str) -> Any:
    from transformers import GPT2Config, Qwen2Config

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if arch == "gpt2":
        return GPT2Config(**spec, **ids)
    return Qwen2Config(**spec, tie_word_embeddings=True, **ids)


def ensure_backbones(shape: str, cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """``{policy, tokenizer, reward, params}`` of ``shape``, built once into ``cache_dir/shape``.

    ``policy``: the random-weight causal LM (no tokenizer files: with a ``qwen2`` config next to
    them, ``AutoTokenizer`` would force its Qwen2 BPE class onto the word-level vocabulary, so the
    tokenizer has its own folder, passed as ``ModelConfig.tokenizer``). ``reward``: the frozen
    reward model for RL, stored as a perlhf ``RewardModule`` export is, a peft ``SEQ_CLS`` adapter
    (with the score head) plus the tokenizer, on ``reward_base``, a same-shape classifier with its
    own seeded weights; ``RolloutDataModule`` merges the two on load.
    """
    root = Path(cache_dir) / shape
    info_path = root / "bench-shape.json"
    wanted = {"shape": SHAPES[shape], "seed": seed, "version": 5}
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("spec") == wanted:
            return info
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from perlhf.models import default_lora_targets

    shutil.rmtree(root, ignore_errors=True)  # nothing stale (e.g. a config.json) may survive
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.save_pretrained(root / "tokenizer")
    config = model_config(shape)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in policy.parameters())
    policy.save_pretrained(root / "policy")
    del policy
    torch.manual_seed(seed + 1)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config)
    reward.save_pretrained(root / "reward-base")
    lora = LoraConfig(task_type="SEQ_CLS", r=1, target_modules=default_lora_targets(reward))
    # B = 0: the merged model is reward-base with its score head. The adapter names no base (it
    # is passed as ``reward_base``): a named qwen2 base would again pick the tokenizer class.
    adapter = get_peft_model(reward, lora)
    adapter.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    del reward, adapter
    info = {
        "spec": wanted,
        "policy": str(root / "policy"),
        "tokenizer": str(root / "tokenizer"),
        "reward": str(root / "reward"),
        "reward_base": str(root / "reward-base"),
        "params": params,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


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


def _trainer(spec: dict, setting: Setting, callbacks: list, root: str) -> Any:
    import lightning.pytorch as L

    return L.Trainer(
        accelerator="gpu" if spec["device"] == "cuda" else "cpu",
        devices=1,
        precision=setting.precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=root,
    )


def _model_config(spec: dict, setting: Setting, finetune: str | None = None) -> Any:
    from perlhf.models import LoraSpec, ModelConfig

    rank = setting.rank or 8
    return ModelConfig(
        name_or_path=spec["policy"],
        tokenizer=spec["tokenizer"],
        finetune=finetune or setting.finetune,
        lora=LoraSpec(r=rank, alpha=2.0 * rank),
        gradient_checkpointing=setting.ckpt,
        dtype=setting.load_dtype,
    )


def run_worker(spec: dict) -> dict:
    """Measure one (task, setting) in this process; returns the result record."""
    # Every worker imports the same modules before anything is measured, so that the baseline's
    # runtime share of the RSS is every other worker's too.
    import lightning.pytorch  # noqa: F401
    import torch

    import perlhf.data  # noqa: F401
    import perlhf.modules  # noqa: F401
    from perlhf.utils import peak_memory_mb

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    setting = parse_setting(spec["setting"], spec.get("grad_ckpt", False), spec["precision"])
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    record: dict[str, Any] = {
        "task": spec["task"],
        "shape": spec["shape"],
        "setting": setting.label,
        "finetune": setting.finetune,
        "rank": setting.rank,
        "grad_ckpt": setting.ckpt,
        "precision": setting.precision,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "import_rss_mb": peak_memory_mb(torch.device("cpu")),
    }
    torch.manual_seed(spec.get("seed", 0))
    with tempfile.TemporaryDirectory() as root:
        if setting.finetune == "baseline":
            _baseline(spec, setting, device, record)
        elif spec["task"] == "rm":
            _reward(spec, setting, device, root, record)
        else:
            _rl(spec, setting, device, root, record)
    record.update(_memory(device))
    return record


def _baseline(spec: dict, setting: Setting, device: Any, record: dict) -> None:
    """The floor every setting pays: imports + the one frozen backbone (+ the RL reward model)."""
    from perlhf.data.rollout_utils import load_reward_model
    from perlhf.models import build_causal_lm, build_reward_model

    cfg = _model_config(spec, setting, finetune="full")
    reward = None
    if spec["task"] == "rm":
        model = build_reward_model(cfg, pad_token_id=1)
    else:
        model = build_causal_lm(cfg)
        reward, _ = load_reward_model(spec["reward"], spec["reward_base"], dtype=spec["reward_dtype"])
        reward.to(device)
    model.requires_grad_(False).to(device)
    # from_pretrained may leave the weights memory-mapped and unread; training reads them all,
    # so read them here too, or the floor would miss the weights themselves.
    for module in (model, reward) if spec["task"] != "rm" else (model,):
        for param in module.parameters():
            param.detach().float().sum().item()
    record["trainable_params"] = 0


def rm_batches(spec: dict) -> list[dict[str, Any]]:
    """The reward-model batches of a run: ``warmup + steps`` batches of ``input_ids`` /
    ``attention_mask`` ``(2·rm_pairs, rm_length)`` (chosen rows first), random non-special tokens
    drawn from ``seed``, so every setting (and ``race_trl.py``'s TRL side) sees the same data."""
    import torch

    pairs, length, vocab = spec["rm_pairs"], spec["rm_length"], SHAPES[spec["shape"]]["vocab_size"]
    generator = torch.Generator().manual_seed(spec.get("seed", 0))
    return [
        {
            "input_ids": torch.randint(len(SPECIAL_IDS), vocab, (2 * pairs, length), generator=generator),
            "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
        }
        for _ in range(spec["warmup"] + spec["steps"])
    ]


def _reward(spec: dict, setting: Setting, device: Any, root: str, record: dict) -> None:
    from torch.utils.data import DataLoader

    from perlhf.models import count_parameters
    from perlhf.modules import RewardModule

    pairs, length = spec["rm_pairs"], spec["rm_length"]
    batches = rm_batches(spec)
    module = RewardModule(_model_config(spec, setting))
    clock = PhaseClock(device.type == "cuda")
    recomputes: list[Callable[[], int]] = []

    def on_start(trainer: Any, module: Any) -> None:
        record["trainable_params"], record["total_params"] = count_parameters(module)
        record["setup_peak_mb"] = _memory(device)["peak_mb"]
        recomputes.append(count_recomputes(module))

    trainer = _trainer(spec, setting, [_step_timer(clock, on_start)], root)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    steps = clock.steps[spec["warmup"] :]
    step_s = statistics.median(s["batch_s"] for s in steps)
    record.update(
        {
            "steps": len(steps),
            "warmup": spec["warmup"],
            "step_s": step_s,
            "step_times_s": [s["batch_s"] for s in clock.steps],
            "interval_s": statistics.median(s["interval_s"] for s in steps),
            "step_cpu_s": statistics.median(s["cpu_batch_s"] for s in steps),
            "tokens_per_step": 2 * pairs * length,
            "tokens_per_s": 2 * pairs * length / step_s,
            "backward_recomputes": recomputes[0](),
            "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        }
    )


RL_PHASES = ("generate", "score", "rollout_other", "old_logprobs_values", "reference", "update", "other")


def rl_prompts(spec: dict) -> list[str]:
    """The RL prompt set of a run: ``4·rl_prompts + 20`` texts of ``prompt_length`` random words
    (one token each), drawn from ``seed``, each ending in a space: it keeps the prompt's last word
    apart from the response's first one in the text the reward model re-tokenises."""
    import random

    rng = random.Random(spec.get("seed", 0))
    vocab = SHAPES[spec["shape"]]["vocab_size"]
    return [
        " ".join(f"w{rng.randrange(len(SPECIAL_IDS), vocab)}" for _ in range(spec["prompt_length"])) + " "
        for _ in range(4 * spec["rl_prompts"] + 20)
    ]


def _rl(spec: dict, setting: Setting, device: Any, root: str, record: dict) -> None:
    import torch

    from perlhf.data import RolloutDataModule
    from perlhf.models import count_parameters
    from perlhf.modules import PPOModule
    from perlhf.modules.rl_config import PPOSpec

    n_prompts, k = spec["rl_prompts"], spec["rl_samples"]
    plen, new_tokens = spec["prompt_length"], spec["new_tokens"]
    prompts_file = Path(root) / "prompts.jsonl"
    with prompts_file.open("w") as f:
        for prompt in rl_prompts(spec):
            f.write(json.dumps({"prompt": prompt}) + "\n")
    total = spec["warmup"] + spec["steps"]
    algorithm = spec["task"]
    epochs = spec.get("ppo_epochs") or (4 if algorithm == "ppo" else 1)
    module = PPOModule(
        _model_config(spec, setting),
        algorithm=algorithm,
        ppo=PPOSpec(
            epochs=epochs,
            minibatch_size=spec["minibatch"],
            gradient_accumulation=spec.get("gradient_accumulation", 1),
        ),
        log_samples_every=0,
    )
    data = RolloutDataModule(
        path="json",
        data_files={"train": str(prompts_file)},
        reward_model=spec["reward"],
        reward_base=spec["reward_base"],
        reward_dtype=spec["reward_dtype"],
        max_prompt_length=plen,
        prompts_per_rollout=n_prompts,
        samples_per_prompt=k,
        rollouts_per_epoch=total,
        max_new_tokens=new_tokens,
        stop_at_eos=False,
        seed=spec.get("seed", 0),
    )
    # Identical lengths for every setting: exactly ``new_tokens`` tokens, never a special token
    # (which would decode to nothing and change what the reward model sees).
    data.sampling |= {"min_new_tokens": new_tokens, "suppress_tokens": list(SPECIAL_IDS)}
    clock = PhaseClock(device.type == "cuda")

    def rollout(fn: Callable) -> Callable:
        def timed(prompts: list, train: bool) -> dict:
            clock.sync()
            start = time.perf_counter()
            batch = fn(prompts, train)
            clock.sync()
            elapsed = time.perf_counter() - start
            stats = batch["stats"]
            clock.add("generate", stats["rollout/generate_s"])
            clock.add("score", stats["rollout/score_s"])
            clock.add("rollout_other", elapsed - stats["rollout/generate_s"] - stats["rollout/score_s"])
            shape = tuple(batch["response_ids"].shape)
            if shape != (n_prompts * k, new_tokens) or not bool(batch["response_mask"].all()):
                raise RuntimeError(
                    f"rollout is not fixed-length: responses {shape}, {int(batch['response_mask'].sum())} "
                    f"unmasked tokens; expected {n_prompts * k}x{new_tokens}"
                )
            return batch

        return timed

    recomputes: list[Callable[[], int]] = []

    def on_start(trainer: Any, module: Any) -> None:
        record["trainable_params"], record["total_params"] = count_parameters(module)
        record["setup_peak_mb"] = _memory(device)["peak_mb"]
        recomputes.append(count_recomputes(module.policy))
        data._rollout = rollout(data._rollout)
        module._forward = clock.wrap(
            module._forward, "old_logprobs_values", lambda: not torch.is_grad_enabled()
        )
        module.reference_logprobs = clock.wrap(module.reference_logprobs, "reference")
        module._update = clock.wrap(module._update, "update")

    trainer = _trainer(spec, setting, [_step_timer(clock, on_start)], root)
    trainer.fit(module, datamodule=data)
    steps = clock.steps[spec["warmup"] :]
    for step in clock.steps:
        step["other"] = step["interval_s"] - sum(step.get(p, 0.0) for p in RL_PHASES[:-1])
    step_s = statistics.median(s["interval_s"] for s in steps)
    n = n_prompts * k
    record.update(
        {
            "steps": len(steps),
            "warmup": spec["warmup"],
            "step_s": step_s,
            "step_times_s": [s["interval_s"] for s in clock.steps],
            "step_cpu_s": statistics.median(s["cpu_interval_s"] for s in steps),
            "phases_s": {p: statistics.median(s.get(p, 0.0) for s in steps) for p in RL_PHASES},
            "phase_steps": clock.steps,
            "samples_per_step": n,
            "samples_per_s": n / step_s,
            "response_tokens": new_tokens,
            "backward_recomputes": recomputes[0](),
            "ppo_epochs": epochs,
            "reward_mean": float(trainer.callback_metrics.get("train/reward", float("nan"))),
        }
    )


# --------------------------------------------------------------------------------------- driver
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


if __name__ == "__main__":
    main()
