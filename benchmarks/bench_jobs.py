"""The benchmark's jobs, each run in its own worker process: the frozen-backbone baseline, the
reward-model step (``rm``) and the RL step (``ppo`` / ``reinforce``) (see ``bench.py``)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_shapes import SHAPES, SPECIAL_IDS, Setting, parse_setting
from bench_timing import PhaseClock, _memory, _step_timer, count_recomputes, cpu_model, rl_step_record


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
    record.update(
        {
            **rl_step_record(clock, spec["warmup"], RL_PHASES, n_prompts * k, new_tokens),
            "backward_recomputes": recomputes[0](),
            "ppo_epochs": epochs,
            "reward_mean": float(trainer.callback_metrics.get("train/reward", float("nan"))),
        }
    )
