"""The built wheel works outside the checkout: configs inside it, the ``perlhf`` console script,
the quickstart's prepare step and one stage, from an empty directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the sources (no stale ``build/`` files)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("perlhf", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src], check=True)
    (built,) = out.glob("perlhf-*.whl")
    return built


def test_wheel_holds_every_package_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "perlhf").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "add new packages to pyproject's list"
    configs = {f"perlhf/{p.relative_to(REPO)}" for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs <= names
    assert "perlhf/configs/quickstart/sft.yaml" in names


def test_installed_wheel_runs_the_quickstart_prepare_step_and_a_stage_from_an_empty_dir(
    wheel: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    target, workdir = tmp_path / "site", tmp_path / "empty"
    workdir.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", target, wheel], check=True)
    # The shared environment supplies the dependencies; perlhf itself comes from the wheel.
    env = os.environ | {"PYTHONPATH": str(target)}

    def perlhf(*args: str) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [str(target / "bin" / "perlhf"), *args], cwd=workdir, env=env, capture_output=True, text=True
        )
        return run

    where = subprocess.run(
        [sys.executable, "-c", "import perlhf.paths as p; print(p.__file__, p.configs_dir())"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(target)) and where[1] == str(target / "perlhf" / "configs")

    # The prepare step skips a model that is already there: reuse the session's tiny model.
    root = workdir / "checkpoints" / "quickstart"
    root.mkdir(parents=True)
    os.symlink(tiny_model_dir, root / "tiny-gpt2")
    prepared = perlhf("quickstart", "--prepare-only")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert (root / "data" / "preference" / "train.jsonl").is_file()
    assert {"sft.yaml", "reward.yaml", "reinforce.yaml"} <= {p.name for p in (root / "configs").iterdir()}

    # Stage order: the reward model needs the SFT export, and the message says which command.
    early = perlhf("fit", "--config", "checkpoints/quickstart/configs/reward.yaml")
    assert early.returncode != 0
    assert "run `perlhf fit --config checkpoints/quickstart/configs/sft.yaml` first" in early.stderr
    assert "Traceback" not in early.stderr

    short = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false"]
    sft = perlhf("fit", "--config", "checkpoints/quickstart/configs/sft.yaml", *short)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert (root / "sft-model" / "merged" / "config.json").is_file()
    assert list((root / "logs" / "sft").glob("version_*/checkpoints/last.ckpt"))
