"""Tiny offline backbones: a byte-level BPE tokenizer and a GPT-2- or Llama-shaped model.

Nothing here touches a model hub. The tokenizer is trained in process with the ``tokenizers``
library on the built-in task's text (byte-level, so any string still tokenizes), and the model is
randomly initialised from a config. ``save_tiny`` writes both in ``from_pretrained`` form so the
real loading code path (``AutoModel*.from_pretrained(path)``) is what tests and the quickstart run.

    python -m perlhf.tiny checkpoints/tiny-gpt2 --arch gpt2
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    set_seed,
)

from perlhf.data import synthetic

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# A minimal chat format: "<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

Arch = Literal["gpt2", "llama"]


def build_tiny_tokenizer(
    vocab_size: int = 512, corpus: Iterable[str] | None = None, extra_special_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` (default: the built-in task's text); pad is distinct
    from eos; ``extra_special_tokens`` (e.g. a VLM's ``<image>``) are single, unsplittable tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *CHAT_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic.corpus() if corpus is None else corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[*CHAT_TOKENS, *extra_special_tokens],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    arch: Arch = "gpt2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
) -> PretrainedConfig:
    """Config of a tiny model for ``tokenizer``; eos/pad ids are wired in."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **ids
        )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads // 2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **ids,
        )
    raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    seed: int = 0,
    complete_list_steps: int = 0,
) -> float:
    """Causal-LM pretraining on the built-in task's text; returns the last loss.

    LoRA adapts features a backbone already has. A randomly initialised backbone has none, so
    the tiny model gets a few seconds of language modelling first, as a real base model would
    have had, and LoRA then behaves as it does on real models.

    The first ``complete_list_steps`` of the ``steps`` see only complete topic lists
    (``synthetic.corpus(complete=1.0)``), where each next word is one not yet said: that teaches
    the model to condition on what it already wrote, which it learns slowly otherwise (on mixed
    lists alone, the probability of repeating a word said had not fallen after 3,000 steps). The
    rest is the mixed corpus, a quarter of it still complete lists so the skill stays. AdamW at
    3e-3, cosine-annealed to 3e-4.
    """
    first = min(complete_list_steps, steps)
    texts = [
        *synthetic.corpus(n=first * 32, seed=seed + 2, complete=1.0),
        *synthetic.corpus(n=(steps - first) * 32, seed=seed + 1),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=3e-4)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = tokenizer(
            [t + tokenizer.eos_token for t in texts[step * 32 : (step + 1) * 32]],
            padding=True,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def save_tiny(
    out_dir: str | Path,
    arch: Arch = "gpt2",
    seed: int = 0,
    pretrain_steps: int = 200,
    complete_list_steps: int = 0,
    **config_kwargs: int,
) -> Path:
    """Write a tiny causal LM and its tokenizer to ``out_dir`` (``from_pretrained`` layout).

    The same folder loads as ``AutoModelForCausalLM`` (policy) or
    ``AutoModelForSequenceClassification`` (reward model; the score head starts fresh).
    """
    from transformers import AutoModelForCausalLM

    set_seed(seed)
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, arch, **config_kwargs))
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed, complete_list_steps)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny offline model + tokenizer.")
    parser.add_argument("out_dir", help="folder to write (from_pretrained layout)")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="LM steps on task text (0: random)")
    parser.add_argument(
        "--complete-list-steps", type=int, default=0, help="of those, first on complete lists"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny(
        args.out_dir,
        args.arch,
        args.seed,
        pretrain_steps=args.pretrain_steps,
        complete_list_steps=args.complete_list_steps,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
    )
    print(f"wrote tiny {args.arch} model and tokenizer to {path}")


if __name__ == "__main__":
    main()
