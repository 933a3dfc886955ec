"""Images in prompts: loading them from a dataset column, rendering with a VLM's processor, batching.

An image column holds, per row, one image or a list of them, each a local file path, image bytes
(a ``datasets`` ``Image`` column, decoded here so a bad image is reported with its row), or a PIL
image. A prompt with images is one user turn — the images, then the text — rendered with the
processor's chat template; the processor expands each image placeholder into the image tokens
the model expects.

Token ids are made once, when a dataset is encoded; pixel inputs are made per batch from the
stored images with the processor's image processor (one row at a time), and rows are joined by
``combine_vision``: every image input is concatenated along its first axis in row order (the
order in which the model fills the image tokens), zero-padding any other axis that differs
between rows (image crops or patches; the models ignore the zero padding).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError

from perlhf.data.loading import local_files

IMAGE_COLUMNS = ("images", "image")
"""Columns detected as the image column when ``image_column`` is not set."""
Vision = dict[str, torch.Tensor]
"""A VLM's image inputs for some rows: ``pixel_values`` and, per model, ``image_sizes``,
``pixel_attention_mask``, ``image_grid_thw``…"""


def load_processor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """A VLM's processor (``AutoProcessor``) whose tokenizer pads (with eos if it has no pad token)."""
    from transformers import AutoProcessor

    from perlhf.models import load_tokenizer

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"{name_or_path!r} has no image processor, so it cannot encode image prompts; the data has an "
            "image column, so use a vision-language model (or set tokenizer= to its folder or hub id)"
        )
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    return processor


def find_image_column(found: Sequence[str], explicit: str | None, where: str) -> str | None:
    """``explicit`` (which must exist), else the first of ``IMAGE_COLUMNS`` present, else None."""
    if explicit is None:
        return next((c for c in IMAGE_COLUMNS if c in found), None)
    if explicit not in found:
        raise ValueError(f"{where} has no column {explicit!r} (image_column); columns: {list(found)}")
    return explicit


def undecoded(dataset: Dataset, column: str) -> Dataset:
    """``dataset`` with ``datasets.Image`` features in ``column`` left as ``{"bytes", "path"}``,
    so that ``load_image`` decodes them and reports a bad one with its row."""
    feature = dataset.features[column]
    if isinstance(feature, ImageFeature):
        return dataset.cast_column(column, ImageFeature(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ImageFeature):
        return dataset.cast_column(column, type(feature)(ImageFeature(decode=False)))
    return dataset


def data_image_root(image_root: str | None, path: Any, data_files: Any) -> Path:
    """The folder image paths of a dataset are read under: ``image_root`` when set, else the folder
    holding its local data files (their common parent), else the working directory."""
    if image_root is not None:
        return Path(image_root)
    files = [file for _, file in local_files(path, data_files)] if isinstance(path, str) else []
    return Path(os.path.commonpath([f.resolve().parent for f in files])) if files else Path.cwd()


def load_image(
    value: Any, where: str, root: str | Path | None = None, allow_outside: bool = False
) -> Image.Image:
    """One RGB image from a PIL image, a file path, raw bytes or a ``{"bytes", "path"}`` dict.

    ``where`` names the dataset, row and column in errors. With ``root``, a path is read relative
    to it and must lie inside it (``~`` is not expanded, ``..`` cannot leave it) unless
    ``allow_outside``: a dataset from an untrusted source cannot make the run read any file."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source, what = io.BytesIO(value), "its image bytes"
    elif isinstance(value, (str, Path)):
        base = Path(root if root is not None else Path.cwd()).resolve()
        path = (base / value).resolve()
        if root is not None and not allow_outside and not path.is_relative_to(base):
            raise ValueError(
                f"{where}: image path {str(value)!r} is outside image_root {base}; images are read only "
                "under image_root — set data.init_args.image_root to their folder, or "
                "allow_images_outside_root: true for data you trust"
            )
        if not path.is_file():
            raise ValueError(
                f"{where}: image file {str(value)!r} not found (relative paths are read from {base}); "
                "fix the path, set image_root to the folder it is relative to, or store the image bytes "
                "in a datasets Image column"
            )
        source, what = path, f"image file {str(value)!r}"
    else:
        raise ValueError(
            f"{where}: expected an image (a file path, image bytes or a PIL image), got "
            f"{'null' if value is None else type(value).__name__}; fix or remove the row"
        )
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"{where}: {what} cannot be read as an image ({type(err).__name__}: {err}); replace the "
            "file with a valid PNG/JPEG or remove the row"
        ) from None


def row_images(
    value: Any, where: str, root: str | Path | None = None, allow_outside: bool = False
) -> list[Image.Image]:
    """The images of one row: one image, a list of images, or None / ``[]`` for none (paths read
    under ``root``, see ``load_image``)."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [
        load_image(v, f"{where}, image {i}" if len(values) > 1 else where, root, allow_outside)
        for i, v in enumerate(values)
    ]


def user_turn(text: str, n_images: int) -> list[dict[str, Any]]:
    """One user message: ``n_images`` image placeholders, then ``text`` (Hugging Face format)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, text: str, n_images: int) -> str:
    """The prompt text as the model sees it: the user turn with a generation prompt, rendered
    with the processor's chat template (image placeholders not yet expanded)."""
    if not processor.chat_template:
        raise ValueError(
            f"the processor of {processor.tokenizer.name_or_path!r} has no chat template, which image "
            "prompts are rendered with; use an instruct/chat VLM or save a chat_template with its processor"
        )
    return processor.apply_chat_template(
        user_turn(text, n_images), add_generation_prompt=True, tokenize=False
    )


def encode_with_images(processor: Any, text: str, images: list[Image.Image]) -> list[int]:
    """Token ids of ``text`` with every image placeholder expanded to the image's tokens."""
    has_bos = bool(processor.tokenizer.bos_token) and text.startswith(processor.tokenizer.bos_token)
    encoded = processor(
        text=[text], images=[images] if images else None, add_special_tokens=not has_bos, return_tensors="pt"
    )
    return encoded["input_ids"][0].tolist()


def image_inputs(processor: Any, images: list[Any]) -> Vision:
    """Image inputs of one row's images (what the processor adds to the token ids); the images
    as ``load_image`` takes them (an encoded dataset stores ``{"bytes", "path"}``)."""
    image_processor = processor.image_processor
    images = [load_image(image, "encoded example") for image in images]
    out = image_processor([images], return_tensors="pt")
    return {k: v for k, v in out.items() if k in image_processor.model_input_names}


def combine_vision(parts: Sequence[Vision | None]) -> Vision:
    """Rows' image inputs joined along the first axis, in row order; rows without images (None or
    empty) contribute nothing. Axes other than the first are zero-padded to the longest row."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    combined = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape:
                pad = t.new_zeros((t.shape[0], *shape))
                pad[tuple(slice(0, n) for n in t.shape)] = t
                t = pad
            padded.append(t)
        combined[key] = torch.cat(padded)
    return combined
