"""Prepare the offline quickstart: a tiny model and the built-in task's data, no hub needed.

    python -m perlhf.quickstart            # writes checkpoints/quickstart/{tiny-gpt2,data}

Then ``python cli.py fit --config configs/quickstart/reward.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perlhf.data import synthetic
from perlhf.tiny import save_tiny


def prepare(root: str | Path = "checkpoints/quickstart", force: bool = False) -> Path:
    """Write ``<root>/tiny-gpt2``, ``<root>/data/preference/{train,val}.jsonl`` and
    ``<root>/data/prompts.jsonl`` (each skipped if present)."""
    root = Path(root)
    model_dir = root / "tiny-gpt2"
    if force or not (model_dir / "config.json").exists():
        save_tiny(model_dir, arch="gpt2")
    data_dir = root / "data" / "preference"
    if force or not (data_dir / "val.jsonl").exists():
        synthetic.write_preference_data(data_dir)
    prompts = root / "data" / "prompts.jsonl"
    if force or not prompts.exists():
        synthetic.write_jsonl(synthetic.prompts(2000, seed=2), prompts)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="checkpoints/quickstart")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args(argv)
    root = prepare(args.root, args.force)
    print(f"quickstart model and data ready under {root}")


if __name__ == "__main__":
    main()
