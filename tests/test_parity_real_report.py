"""The real-model parity report says which learning-rate grids are only partly run."""

from __future__ import annotations

from pathlib import Path

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "parity_real.py"


def _load():
    return load_script(SCRIPT, "perlhf_parity_real")


def _run(stage: str, setting: str, lr: float, score: float, kl: float = 1.0) -> dict:
    record = {"stage": stage, "setting": setting, "lr": lr, "trainable": 10, "seed": 0}
    record |= {"cpu_seconds_per_step": 5.0, "seconds_per_step": 2.5, "peak_rss_mib": 3000.0}
    if stage == "reward":
        return record | {"accuracy": score}
    return record | {"judge_score": score, "win_rate": 0.5, "kl_to_start": kl}


def test_partial_grids_are_named_and_every_run_is_listed() -> None:
    parity = _load()
    whole = [_run("reward", "full", lr, 0.6) for lr in parity.LR_GRID["reward"]["full"]]
    assert parity.coverage(whole) == ""
    runs = [*whole, _run("reward", "lora-attn-r1", 2e-3, 0.71), _run("rl", "lora-attn-r8", 2e-4, 0.5)]
    assert parity.coverage(runs) == (
        "**Partial grids**: reward lora-attn-r1 (lr 0.002 of the grid); "
        "rl lora-attn-r8 (lr 0.0002 of the grid).\n\n"
    )
    rows = parity.all_runs(runs).splitlines()[2:]
    assert len(rows) == len(whole) + 2
    assert rows[-2] == "| reward | lora-attn-r1 | 0.002 | 0.710 | — | — | 5.0 | 2.5 | 3,000 |"
    assert rows[-1].startswith("| rl | lora-attn-r8 | 0.0002 | +0.500 | 50% | 1.00 |")
    # The summary keeps the best learning rate of what ran.
    assert "| lora-attn-r1 | 10 | 0.002 | 0.710 |" in parity.table(runs)


def test_best_rl_learning_rate_stays_within_the_kl_bound() -> None:
    parity = _load()
    bound = parity.KL_BOUND
    runs = [
        _run("rl", "full", 1e-5, 0.50, kl=bound - 1),
        _run("rl", "full", 3e-5, 0.60, kl=bound),  # best within the bound
        _run("rl", "full", 1e-4, 0.90, kl=bound + 0.1),  # higher score, past the bound
    ]
    assert "| full | — | — | — | — | — | 3e-05 | +0.600 |" in parity.table(runs)
    drifted = [_run("rl", "full", 1e-4, 0.90, kl=bound + 5), _run("rl", "full", 3e-4, 0.95, kl=bound + 9)]
    # None within the bound: the best score, its KL marked.
    assert f"| full | — | — | — | — | — | 0.0003 | +0.950 | 50% | {bound + 9:.2f} (over {bound:g}) |" in (
        parity.table(drifted)
    )
