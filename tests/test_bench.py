"""benchmarks/bench.py on the tiny shape: real RewardModule / PPOModule fits, 2 steps each."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("perlhf_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    info = bench.ensure_backbones("tiny", tmp_path_factory.mktemp("bench-cache"))
    return {
        "shape": "tiny",
        "device": "cpu",
        "precision": "32-true",
        "rm_pairs": 2,
        "rm_length": 16,
        "rl_prompts": 3,
        "rl_samples": 1,
        "prompt_length": 8,
        "new_tokens": 5,
        "minibatch": 16,
        "steps": 2,
        "warmup": 0,
        "reward_dtype": "float32",
        "threads": 1,
        "policy": info["policy"],
        "tokenizer": info["tokenizer"],
        "reward": info["reward"],
        "reward_base": info["reward_base"],
    }


def test_settings_syntax() -> None:
    assert bench.parse_setting("lora-r8+ckpt+bf16-true") == bench.Setting(
        "lora-r8+ckpt+bf16-true", "lora", 8, True, "bf16-true"
    )
    assert bench.parse_setting("full", grad_ckpt=True, precision="bf16-mixed").ckpt
    with pytest.raises(ValueError, match="unknown suffix"):
        bench.parse_setting("lora-r8+fast")


def test_worker_measures_full_and_lora_for_rm_and_rl(tiny: dict, tmp_path: Path) -> None:
    # One worker through the real subprocess path (what the driver runs), the rest in process.
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps({**tiny, "task": "rm", "setting": "lora-r4"}))
    cmd = [sys.executable, str(BENCH), "--worker", str(spec_path), "--result", str(result_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    records = {("rm", "lora-r4"): json.loads(result_path.read_text())}
    for task, setting in [("rm", "full"), ("reinforce", "full"), ("reinforce", "lora-r4")]:
        records[task, setting] = bench.run_worker({**tiny, "task": task, "setting": setting})

    for (task, _), r in records.items():
        assert r["steps"] == 2 and len(r["step_times_s"]) == 2
        assert r["step_s"] > 0 and all(t > 0 for t in r["step_times_s"])
        assert r["peak_mb"] > 0 and r["peak_rss_mb"] >= r["import_rss_mb"] > 0
        assert (r["tokens_per_s"] if task == "rm" else r["samples_per_s"]) > 0
    for task in ("rm", "reinforce"):
        lora, full = records[task, "lora-r4"], records[task, "full"]
        assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    for setting in ("full", "lora-r4"):
        r = records["reinforce", setting]
        assert r["response_tokens"] == 5 and r["samples_per_step"] == 3
        for step in r["phase_steps"]:
            measured = [step[p] for p in bench.RL_PHASES[:-1]]
            assert step["generate"] > 0 and step["update"] > 0 and step["reference"] > 0
            assert step["old_logprobs_values"] > 0 and step["score"] > 0
            assert all(t >= 0 for t in measured)
            assert sum(measured) <= step["interval_s"] + 1e-3  # phases fit inside the step
            assert step["batch_s"] <= step["interval_s"] + 1e-3

    meta = {
        "command": "python benchmarks/bench.py --shapes tiny",
        "versions": bench._versions(),
        "cpu": bench.cpu_model(),
        "options": {**tiny, "ppo_epochs": None},
        "shapes": {"tiny": {"params": 1}},
        "started": "now",
    }
    out = tmp_path / "out"
    bench.write_outputs(out, meta, list(records.values()))
    text = (out / "bench.md").read_text()
    assert "### Reward model, tiny" in text and "### RL (reinforce), tiny" in text
    assert "| lora-r4 | no | 32-true | 3,136 |" in text
    assert json.loads((out / "bench.json").read_text())["results"]
    assert (out / "bench.png").stat().st_size > 0
