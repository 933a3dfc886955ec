"""Bad input, one row per class of mistake: each run through the CLI must stop before training
with an error naming the config key, file, line or checkpoint, and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from perlhf.cli import cli_main

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, preference_dir: Path) -> Path:
    """Configs of a reward-model run and an RL run on tiny data, and a reward-model checkpoint."""
    root = tmp_path_factory.mktemp("bad-input")
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
    reward = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "max_steps": 2, "default_root_dir": str(root / "runs")},
        "model": {
            "class_path": "perlhf.modules.RewardModule",
            "init_args": {
                "model": {"name_or_path": str(tiny_model_dir), "lora": LORA},
                "optimizer": optimizer,
            },
        },
        "data": {
            "class_path": "perlhf.data.PreferenceDataModule",
            "init_args": {
                "path": "json",
                "data_files": files,
                "max_length": 64,
                "batch_size": 8,
                "max_train_samples": 32,
                "max_val_samples": 8,
            },
        },
    }
    rl = {
        "trainer": {**TRAINER, "max_steps": 1, "default_root_dir": str(root / "runs")},
        "model": {
            "class_path": "perlhf.modules.PPOModule",
            "init_args": {
                "model": {"name_or_path": str(tiny_model_dir), "lora": LORA},
                "optimizer": optimizer,
            },
        },
        "data": {
            "class_path": "perlhf.data.RolloutDataModule",
            "init_args": {
                "path": "prompts.jsonl",
                "reward_model": str(tiny_model_dir),  # an existing folder: the stage-order check passes
                "samples_per_prompt": 2,
            },
        },
    }
    write(root / "reward.yaml", yaml.safe_dump(reward))
    write(root / "rl.yaml", yaml.safe_dump(rl))
    cli_main(["fit", "--config", str(root / "reward.yaml")])  # writes a checkpoint of 2 steps
    (last,) = (root / "runs").rglob("*.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    torch.save(checkpoint, root / "reward.ckpt")
    checkpoint["hyper_parameters"]["_class_path"] = "perlhf.modules.PPOModule"
    torch.save(checkpoint, root / "rl.ckpt")
    (root / "truncated.ckpt").write_bytes((root / "reward.ckpt").read_bytes()[:2000])
    (root / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    rows = [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})] * 4
    write(root / "train.jsonl", "\n".join(rows))
    write(root / "empty.jsonl", "")
    write(root / "malformed.jsonl", "\n".join([*rows[:2], '{"prompt": "p", "chosen": "a", ', *rows[2:]]))
    write(root / "other.jsonl", "\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(4)))
    return root


def data_files(train: str, test: str | None = None) -> str:
    return json.dumps({"train": train, "test": test or train})


CASES = {
    # item 8: values that passed construction or failed late
    "negative kl.coef": ("rl", ["--model.init_args.kl.coef=-0.1"], "kl.coef must be >= 0, got -0.1"),
    "negative ppo.cliprange": ("rl", ["--model.init_args.ppo.cliprange=-0.2"], "ppo.cliprange must be > 0"),
    "batch_size 0": ("reward", ["--data.init_args.batch_size=0"], "data.init_args.batch_size must be >= 1"),
    "lora dropout 1.5": (
        "reward",
        ["--model.init_args.model.lora.dropout=1.5"],
        "model.lora.dropout must be in [0, 1)",
    ),
    "negative learning rate": (
        "reward",
        ["--model.init_args.optimizer.init_args.lr=-0.001"],
        "optimizer: Invalid learning rate: -0.001",
    ),
    "rloo with one sample": (
        "rl",
        ["--model.init_args.algorithm=rloo", "--data.init_args.samples_per_prompt=1"],
        "needs data.init_args.samples_per_prompt >= 2",
    ),
    # item 9: raw or empty errors
    "nonexistent model folder": (
        "reward",
        ["--model.init_args.model.name_or_path=checkpoints/nowhere/sft-model/merged"],
        "no such folder",
    ),
    "empty data file": ("reward", ["--data.init_args.data_files", "{empty}"], "empty.jsonl (train) is empty"),
    "malformed jsonl line": (
        "reward",
        ["--data.init_args.data_files", "{malformed}"],
        "malformed.jsonl line 3: not valid JSON",
    ),
    "train/test schema mismatch": (
        "reward",
        ["--data.init_args.data_files", "{mismatch}"],
        "the splits have different columns",
    ),
    "truncated checkpoint": (
        "reward",
        ["--ckpt_path", "{root}/truncated.ckpt"],
        "truncated.ckpt cannot be read",
    ),
    "garbage checkpoint": ("reward", ["--ckpt_path", "{root}/garbage.ckpt"], "garbage.ckpt cannot be read"),
    # item 4: --ckpt_path never silently replaces the config
    "checkpoint of another module": (
        "reward",
        ["--ckpt_path", "{root}/rl.ckpt"],
        "was written by perlhf.modules.PPOModule, but this config trains",
    ),
    "other LoRA rank on resume": (
        "reward",
        ["--ckpt_path", "{root}/reward.ckpt", "--model.init_args.model.lora.r=16"],
        "model.init_args.model.lora.r: checkpoint 4, config 16",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_early_and_names_the_fix(
    case: str, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, args, phrase = CASES[case]
    monkeypatch.chdir(workdir)
    train = str(workdir / "train.jsonl")
    names = {
        "root": str(workdir),
        "empty": data_files(str(workdir / "empty.jsonl")),
        "malformed": data_files(str(workdir / "malformed.jsonl")),
        "mismatch": data_files(train, str(workdir / "other.jsonl")),
    }
    args = [arg.format(**names) for arg in args]
    with pytest.raises((Exception, SystemExit)) as failure:
        cli_main(["fit", "--config", str(workdir / f"{config}.yaml"), *args])
    message = f"{failure.value}\n{capsys.readouterr().err}"
    assert phrase in message, message[-2000:]


def test_resume_applies_a_changed_per_step_value_and_says_so(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    cli = cli_main(
        [
            "fit",
            "--config",
            str(workdir / "reward.yaml"),
            "--trainer.max_steps=3",
            "--ckpt_path",
            str(workdir / "reward.ckpt"),
            "--model.init_args.center_coef=0.1",
        ]
    )
    assert cli.model.center_coef == 0.1 and cli.trainer.global_step == 3
    assert "with model.init_args.center_coef=0.1 (was 0.0)" in capsys.readouterr().err


HUB_CASES = {
    # item 9: a hub id with no way to reach the hub must fail in seconds, naming key, value and fix
    "model hub id, offline mode": (
        "reward",
        "--model.init_args.model.name_or_path=perlhf-test/does-not-exist",
        "offline",
        ["model.name_or_path='perlhf-test/does-not-exist'", "HF_HUB_OFFLINE", "local folder"],
    ),
    "model hub id, hub unreachable": (
        "reward",
        "--model.init_args.model.name_or_path=perlhf-test/does-not-exist",
        "unreachable",
        ["model.name_or_path='perlhf-test/does-not-exist'", "cannot be reached", "local folder"],
    ),
    "reward model hub id, hub unreachable": (
        "rl",
        "--data.init_args.reward_model=perlhf-test/does-not-exist",
        "unreachable",
        ["data.init_args.reward_model='perlhf-test/does-not-exist'", "cannot be reached", "local folder"],
    ),
}


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_hub_id_without_network_fails_fast_naming_the_key(
    case: str, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Independent of this machine's network: offline mode, or an endpoint that refuses at once
    (the discard port of localhost), with an empty cache."""
    import time

    from huggingface_hub import constants

    config, arg, mode, phrases = HUB_CASES[case]
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workdir / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", mode == "offline")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises((Exception, SystemExit)) as failure:
        cli_main(["fit", "--config", str(workdir / f"{config}.yaml"), arg])
    elapsed = time.monotonic() - start
    message = f"{failure.value}\n{capsys.readouterr().err}"
    for phrase in phrases:
        assert phrase in message, message[-2000:]
    assert elapsed < 15, f"took {elapsed:.0f} s to fail"


def test_cached_hub_id_loads_offline_and_names_the_fix_when_the_hub_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from perlhf.hub import check_model_source

    snapshot = tmp_path / "models--perlhf-test--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_model_source("perlhf-test/cached")  # offline mode reads the cached copy: nothing to say
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConnectionError, match="a copy is in the cache: set HF_HUB_OFFLINE=1"):
        check_model_source("perlhf-test/cached", "model.name_or_path")
