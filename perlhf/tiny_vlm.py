"""A tiny offline vision-language model: LLaVA-shaped, with a CLIP vision tower and a Llama LM.

Built from configs (``LlavaConfig`` = tiny ``CLIPVisionConfig`` + tiny ``LlamaConfig``) with a
``LlavaProcessor`` (CLIP image processor + a byte-level BPE tokenizer trained on the shapes task's
text, with an ``<image>`` token and a chat template for image messages), and saved in
``from_pretrained`` layout, so ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it as they
load a hub VLM. A few seconds of pretraining on the shapes task (captions, and questions with
random answers; see ``perlhf.data.shapes.corpus``) give the frozen backbone visual features for
LoRA to use.

    python -m perlhf.tiny_vlm checkpoints/tiny-llava
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    set_seed,
)

from perlhf.data import shapes
from perlhf.data.images import user_turn
from perlhf.tiny import build_tiny_tokenizer

IMAGE_TOKEN = "<image>"
# The tiny chat format of ``perlhf.tiny``, with message content that may be a list of
# ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (Hugging Face's multimodal form).
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_processor(image_size: int = shapes.CANVAS, patch_size: int = 8) -> LlavaProcessor:
    """CLIP image processor at ``image_size`` pixels + a tokenizer trained on the shapes task."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    texts = [q for _, q, _ in shapes.examples(2000, seed=99)] + [shapes.CAPTION]
    texts += [" ".join(shapes.options(k)) for k in ("colour", "shape", "yesno")] * 50
    tokenizer = build_tiny_tokenizer(corpus=texts, extra_special_tokens=(IMAGE_TOKEN,), vocab_size=400)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # drop CLS: one image token per patch
        num_additional_image_tokens=1,
        chat_template=VLM_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def tiny_vlm_config(
    processor: LlavaProcessor, hidden_size: int = 64, num_layers: int = 2, vision_hidden_size: int = 64
) -> LlavaConfig:
    tok = processor.tokenizer
    size = processor.image_processor.crop_size["height"]
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=processor.patch_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def pretrain(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    steps: int,
    seed: int = 0,
    batch: int = 32,
) -> float:
    """Image-conditioned LM training of every weight on ``shapes.corpus``; loss on replies only.
    Returns the last loss."""
    tok = processor.tokenizer
    samples = list(shapes.corpus(steps * batch, seed=seed + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        chunk = samples[step * batch : (step + 1) * batch]
        prompts = [
            processor.apply_chat_template(user_turn(q, 1), add_generation_prompt=True) for _, q, _ in chunk
        ]
        texts = [p + reply + tok.eos_token for p, (_, _, reply) in zip(prompts, chunk, strict=True)]
        images = [[image] for image, _, _ in chunk]
        encoded = processor(text=texts, images=images, padding=True, return_tensors="pt")
        prompt_lengths = processor(text=prompts, images=images, padding=True)["attention_mask"]
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        for row, mask in enumerate(prompt_lengths):
            labels[row, : sum(mask)] = -100  # right padding: the prompt is the first sum(mask) tokens
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def save_tiny_vlm(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 200) -> Path:
    """Write a tiny LLaVA-shaped VLM and its processor to ``out_dir`` (``from_pretrained`` layout)."""
    set_seed(seed)
    out_dir = Path(out_dir)
    processor = build_tiny_processor()
    processor.tokenizer.padding_side = "right"
    model = LlavaForConditionalGeneration(tiny_vlm_config(processor))
    if pretrain_steps:
        pretrain(model, processor, pretrain_steps, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny offline VLM + processor.")
    parser.add_argument("out_dir", help="folder to write (from_pretrained layout)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=200, help="steps on the shapes task (0: random)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny_vlm(args.out_dir, args.seed, args.pretrain_steps)
    print(f"wrote tiny VLM and processor to {path}")


if __name__ == "__main__":
    main()
