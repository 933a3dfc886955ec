"""The benchmark's backbones and settings: random-weight shapes built once in ``from_pretrained``
layout with a word-level tokenizer, per-device defaults, and ``full`` / ``lora-r<rank>[+ckpt][+precision]``
settings (see ``bench.py``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
RL_TASKS = ("ppo", "reinforce")
TASKS = ("rm", *RL_TASKS)
DEFAULT_SETTINGS = "full,lora-r1,lora-r4,lora-r8,lora-r16,lora-r32"
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
SPECIAL_IDS = (0, 1, 2)  # EOS, PAD, UNK: never in data, suppressed in generation

# Backbone shapes (random weights). ``params`` is filled in when a shape is built.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1024, "n_positions": 512},
    "tiny-qwen2": {
        "arch": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
    },
    "gpt2-small": {
        "arch": "gpt2",
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "vocab_size": 50257,
        "n_positions": 1024,
    },
    "qwen2-0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
    },
}

# Defaults per device. GPU: the shape of the repo's Qwen recipes (configs/tldr: RM batch 8 pairs,
# RL 128 episodes per batch, minibatch 16, ~53 new tokens, bf16-mixed, reward model in bf16).
DEFAULTS = {
    "cpu": {
        "shapes": "gpt2-small",
        "precision": "32-true",
        "rm_pairs": 4,
        "rm_length": 256,
        "rl_prompts": 8,
        "rl_samples": 1,
        "prompt_length": 64,
        "new_tokens": 32,
        "minibatch": 16,
        "steps": 3,
        "warmup": 1,
        "reward_dtype": "float32",
    },
    "cuda": {
        "shapes": "gpt2-small,qwen2-0.5b",
        "precision": "bf16-mixed",
        "rm_pairs": 8,
        "rm_length": 512,
        "rl_prompts": 128,
        "rl_samples": 1,
        "prompt_length": 64,
        "new_tokens": 64,
        "minibatch": 16,
        "steps": 5,
        "warmup": 2,
        "reward_dtype": "bfloat16",
    },
}


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One column of the comparison: what trains, and the memory features."""

    label: str
    finetune: str  # "lora", "full", or "baseline" (no training)
    rank: int | None
    ckpt: bool
    precision: str

    @property
    def load_dtype(self) -> str:
        """``ModelConfig.dtype``: weights in bf16 under ``bf16-true``, else fp32 (mixed keeps fp32)."""
        return "bfloat16" if self.precision == "bf16-true" else "float32"


def parse_setting(text: str, grad_ckpt: bool = False, precision: str = "32-true") -> Setting:
    """``full``, ``lora-r8``, ``baseline``, each optionally ``+ckpt`` and/or ``+<precision>``."""
    head, *suffixes = text.strip().split("+")
    ckpt = grad_ckpt
    for suffix in suffixes:
        if suffix == "ckpt":
            ckpt = True
        elif suffix in PRECISIONS:
            precision = suffix
        else:
            raise ValueError(f"setting {text!r}: unknown suffix {suffix!r} (ckpt or one of {PRECISIONS})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if head in ("full", "baseline"):
        return Setting(text.strip(), head, None, ckpt, precision)
    match = re.fullmatch(r"lora-r(\d+)", head)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"setting {text!r}: expected full, lora-r<rank> or baseline")
    return Setting(text.strip(), "lora", int(match.group(1)), ckpt, precision)


# --------------------------------------------------------------------------------------- backbones
def build_tokenizer(vocab_size: int) -> Any:
    """Word-level tokenizer over the model's whole vocabulary: id ``i`` ≥ 3 is the word ``w<i>``,
    0/1/2 are EOS/PAD/UNK; no special tokens are added on encoding. Decoding joins words with
    spaces, so sampled ids round-trip exactly through text (the reward model re-tokenises)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1, UNK: 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=2**20,
    )


def model_config(shape: str) -> Any:
    from transformers import GPT2Config, Qwen2Config

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if arch == "gpt2":
        return GPT2Config(**spec, **ids)
    return Qwen2Config(**spec, tie_word_embeddings=True, **ids)


def ensure_backbones(shape: str, cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """``{policy, tokenizer, reward, params}`` of ``shape``, built once into ``cache_dir/shape``.

    ``policy``: the random-weight causal LM (no tokenizer files: with a ``qwen2`` config next to
    them, ``AutoTokenizer`` would force its Qwen2 BPE class onto the word-level vocabulary, so the
    tokenizer has its own folder, passed as ``ModelConfig.tokenizer``). ``reward``: the frozen
    reward model for RL, stored as a perlhf ``RewardModule`` export is, a peft ``SEQ_CLS`` adapter
    (with the score head) plus the tokenizer, on ``reward_base``, a same-shape classifier with its
    own seeded weights; ``RolloutDataModule`` merges the two on load.
    """
    root = Path(cache_dir) / shape
    info_path = root / "bench-shape.json"
    wanted = {"shape": SHAPES[shape], "seed": seed, "version": 5}
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("spec") == wanted:
            return info
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from perlhf.models import default_lora_targets

    shutil.rmtree(root, ignore_errors=True)  # nothing stale (e.g. a config.json) may survive
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.save_pretrained(root / "tokenizer")
    config = model_config(shape)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in policy.parameters())
    policy.save_pretrained(root / "policy")
    del policy
    torch.manual_seed(seed + 1)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config)
    reward.save_pretrained(root / "reward-base")
    lora = LoraConfig(task_type="SEQ_CLS", r=1, target_modules=default_lora_targets(reward))
    # B = 0: the merged model is reward-base with its score head. The adapter names no base (it
    # is passed as ``reward_base``): a named qwen2 base would again pick the tokenizer class.
    adapter = get_peft_model(reward, lora)
    adapter.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    del reward, adapter
    info = {
        "spec": wanted,
        "policy": str(root / "policy"),
        "tokenizer": str(root / "tokenizer"),
        "reward": str(root / "reward"),
        "reward_base": str(root / "reward-base"),
        "params": params,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info
