"""Rollout generation speed on the real model: perlhf's LoRA policy against plain transformers.

    python -m perlhf.quickstart_real --prepare-only       # the model and the prompts, once
    python benchmarks/generation_real.py                  # -> results/cpu/generation-real.{json,md}

SmolLM2-135M-Instruct with a LoRA r8 policy adapter (attention, and all linear layers), a batch of
32 held-out chat prompts, exactly ``--new-tokens`` sampled tokens per response (EOS suppressed, so
every variant decodes the same number of tokens). Variants:

- ``transformers, merged model``: ``generate`` on a copy of the model with the adapter merged
  and unloaded (``merge_and_unload``): plain transformers decoding, the limit on this machine;
- ``perlhf, adapter unmerged``: ``PPOModule.generate`` with ``merge_for_generation=False``
  (every adapted layer runs ``W x + B A x`` per decoded token);
- ``perlhf, merged for generation``: ``PPOModule.generate`` as rollouts run it (the update folded
  into a temporary copy of each base weight).

Median of ``--repeats`` timed calls after one warm-up, in one process. Take it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fast_paths_real import write_results

from perlhf.evaluate import encode, left_pad
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule
from perlhf.modules.policy import POLICY, active_adapter, clean_generation_config
from perlhf.tasks import sentiment

TARGETS = ("attention", "all-linear")


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(root: Path, target: str, prompts: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    config = ModelConfig(
        name_or_path=str(root / "smollm2-135m-instruct"),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=target),
    )
    module = PPOModule(config)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B away from 0
        for name, p in module.policy.named_parameters():
            if "lora_B" in name and f".{POLICY}." in name:
                p.normal_(0, 0.01)
    tokenizer = module.tokenizer
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in sentiment.prompt_pool("heldout")[:prompts]
    ]
    ids, mask = left_pad([encode(tokenizer, t) for t in texts], tokenizer.pad_token_id)
    kwargs = {
        "do_sample": True,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def perlhf(merge: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            module.merge_for_generation = merge
            return module.generate(ids, mask, **kwargs)

        return call

    with active_adapter(module.policy, POLICY):
        merged_model = copy.deepcopy(module.policy).merge_and_unload().eval()

    def plain() -> torch.Tensor:
        with torch.no_grad(), clean_generation_config(merged_model):
            return merged_model.generate(
                input_ids=ids,
                attention_mask=mask,
                use_cache=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                **kwargs,
            )

    variants = {
        "transformers, merged model": plain,
        "perlhf, adapter unmerged": perlhf(False),
        "perlhf, merged for generation": perlhf(True),
    }
    rows = {}
    for name, fn in variants.items():
        times = timed(fn, repeats)
        median = statistics.median(times)
        rows[name] = {"median_s": median, "times_s": times, "tokens_per_s": prompts * new_tokens / median}
        print(target, name, f"{median:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="checkpoints/real")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu/generation-real")
    args = parser.parse_args()
    results = {t: run(Path(args.root), t, args.prompts, args.new_tokens, args.repeats) for t in TARGETS}
    meta = {
        "command": "python benchmarks/generation_real.py",
        "setup": f"SmolLM2-135M-Instruct, LoRA r8, {args.prompts} prompts x {args.new_tokens} sampled "
        f"tokens, fp32, median of {args.repeats} after a warm-up",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for target, variants in results.items():
        limit = variants["transformers, merged model"]["tokens_per_s"]
        for name, row in variants.items():
            rows.append(
                [
                    target,
                    name,
                    f"{row['median_s']:.2f}",
                    f"{row['tokens_per_s']:.0f}",
                    f"{row['tokens_per_s'] / limit:.2f}x",
                ]
            )
    write_results(
        out,
        {**meta, "results": results},
        "Rollout generation on SmolLM2-135M-Instruct: perlhf against plain transformers",
        f"`{meta['command']}`; {meta['setup']}; {meta['torch_threads']} threads.",
        ["LoRA targets", "variant", "time (s)", "tokens/s", "vs transformers on the merged model"],
        rows,
    )


if __name__ == "__main__":
    main()
