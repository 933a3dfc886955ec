"""Exact resume after ``kill -9``: a real ``cli.py fit`` subprocess is killed mid-epoch, resumed
from its ``last.ckpt``, and must end with the same trainable tensors and optimiser state, bit for
bit, as a run that was never interrupted (reward model, SFT and RL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from perlhf.data import synthetic

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3, "weight_decay": 0.0}}


def fit_config(root: Path, max_steps: int, model: dict, data: dict, kill_at: int | None = None) -> Path:
    """A ``cli.py fit`` config writing under ``root``: ``last.ckpt`` after every step."""
    callbacks: list[dict] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(root / "ckpt"),
                "save_top_k": 0,
                "save_last": True,
                "every_n_train_steps": 1,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "helpers.KillAt", "init_args": {"batch": kill_at}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(root),
            "callbacks": callbacks,
        },
        "model": model,
        "data": data,
    }
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config), *extra],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, expect: int = 0) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == expect, f"exit {process.returncode}, expected {expect}:\n{out[-3000:]}"
    return out


def kill_and_resume(tmp_path: Path, max_steps: int, kill_at: int, model: dict, data: dict) -> None:
    """Uninterrupted run vs. a run killed at batch ``kill_at`` and resumed: identical end state."""
    straight = launch(fit_config(tmp_path / "straight", max_steps, model, data))
    killed = launch(fit_config(tmp_path / "killed", max_steps, model, data, kill_at=kill_at))
    finish(killed, expect=-signal.SIGKILL)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_at
    resumed_config = fit_config(tmp_path / "resumed", max_steps, model, data)
    finish(launch(resumed_config, "--ckpt_path", str(last)))
    finish(straight)

    expected = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", weights_only=True)
    actual = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == max_steps
    assert set(actual["state_dict"]) == set(expected["state_dict"])
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), f"trainable tensor {name} differs"
    for got, want in zip(actual["optimizer_states"], expected["optimizer_states"], strict=True):
        assert got["param_groups"] == want["param_groups"]
        for index, state in want["state"].items():
            for key, value in state.items():
                assert torch.equal(got["state"][index][key], value), f"optimiser {key} of param {index}"


def test_reward_model_resumes_bit_identically_after_kill_9(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    model = {
        "class_path": "perlhf.modules.RewardModule",
        "init_args": {"model": {"name_or_path": str(tiny_model_dir), "lora": LORA}, "optimizer": OPTIMIZER},
    }
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = {
        "class_path": "perlhf.data.PreferenceDataModule",
        "init_args": {
            "path": "json",
            "data_files": files,
            "max_length": 64,
            "batch_size": 16,
            "max_train_samples": 96,
            "max_val_samples": 16,
        },
    }
    # 6 batches per epoch: killed at step 4 of epoch 0, the run ends in epoch 1.
    kill_and_resume(tmp_path, max_steps=8, kill_at=4, model=model, data=data)


def test_sft_resumes_bit_identically_after_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    demos = tmp_path / "demos"
    synthetic.write_jsonl(synthetic.demonstrations(96, seed=0), demos / "train.jsonl")
    synthetic.write_jsonl(synthetic.demonstrations(16, seed=1), demos / "test.jsonl")
    model = {
        "class_path": "perlhf.modules.SFTModule",
        "init_args": {"model": {"name_or_path": str(tiny_model_dir), "lora": LORA}, "optimizer": OPTIMIZER},
    }
    files = {"train": str(demos / "train.jsonl"), "test": str(demos / "test.jsonl")}
    data = {
        "class_path": "perlhf.data.SFTDataModule",
        "init_args": {"path": "json", "data_files": files, "max_length": 64, "batch_size": 16},
    }
    kill_and_resume(tmp_path, max_steps=8, kill_at=3, model=model, data=data)


@pytest.mark.parametrize("algorithm", ["ppo"])
def test_rl_resumes_bit_identically_after_kill_9(
    algorithm: str, tiny_model_dir: Path, reward_export: Path, prompts_file: Path, tmp_path: Path
) -> None:
    model = {
        "class_path": "perlhf.modules.PPOModule",
        "init_args": {
            "model": {"name_or_path": str(tiny_model_dir), "lora": LORA},
            "algorithm": algorithm,
            "ppo": {"epochs": 1, "minibatch_size": 16},
            "kl": {"coef": 0.1, "adaptive": True, "target": 0.5, "horizon": 200},
            "optimizer": OPTIMIZER,
            "log_samples_every": 0,
        },
    }
    data = {
        "class_path": "perlhf.data.RolloutDataModule",
        "init_args": {
            "path": str(prompts_file),
            "reward_model": str(reward_export),
            "val_fraction": 0.1,
            "prompts_per_rollout": 8,
            "samples_per_prompt": 2,
            "rollouts_per_epoch": 3,
            "max_new_tokens": 8,
        },
    }
    # One optimiser step per rollout; killed in the middle of the second epoch.
    kill_and_resume(tmp_path, max_steps=5, kill_at=4, model=model, data=data)
