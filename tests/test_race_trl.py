"""benchmarks/race_trl.py on the tiny shape: perlhf and TRL, reward model and RLOO, 1 measured step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
RACE = Path(__file__).resolve().parents[1] / "benchmarks" / "race_trl.py"


def _load_race():
    return load_script(RACE, "perlhf_race_trl")


def test_race_writes_side_by_side_tables(tmp_path: Path) -> None:
    race = _load_race()
    out = tmp_path / "out"
    # The driver's own path: one worker subprocess per (task, framework).
    race.main(
        ["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", "--cpu"]
        + ["--rm-pairs", "2", "--rm-length", "16", "--rl-prompts", "2", "--rl-samples", "2"]
        + ["--prompt-length", "8", "--new-tokens", "4", "--minibatch", "4"]
        + ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    )
    data = json.loads((out / "race-trl.json").read_text())
    assert data["meta"]["versions"]["trl"]
    records = {(r["task"], r["framework"]): r for r in data["results"]}
    assert set(records) == {(t, f) for t in ("rm", "rloo") for f in ("perlhf", "trl")}
    for (task, _), r in records.items():
        assert "error" not in r, r.get("error")
        assert r["step_s"] > 0 and r["peak_mb"] > 0 and r["import_rss_mb"] > 0
        assert (r["pairs_per_s"] if task == "rm" else r["samples_per_s"]) > 0
    for task in ("rm", "rloo"):
        # Same model, same adapter: the same trainable parameter count on both sides.
        assert records[task, "perlhf"]["trainable_params"] == records[task, "trl"]["trainable_params"] > 0
    for framework in ("perlhf", "trl"):
        r = records["rloo", framework]
        assert r["samples_per_step"] == 4 and r["response_tokens"] == 4
        for phase in ("generate", "score", "old_logprobs", "reference", "update"):
            assert r["phases_s"][phase] > 0, (framework, phase)

    text = (out / "race-trl.md").read_text()
    assert "### Reward model, tiny" in text and "### RLOO, tiny" in text
    for title in ("Reward model", "RLOO"):
        table = text.split(f"### {title}, tiny")[1].split("\n\n")[1].splitlines()
        assert [row.split(" | ")[0] for row in table[2:]] == ["| perlhf", "| TRL", "| **perlhf / TRL**"]
        assert len({row.count("|") for row in table}) == 1  # every row has every column
