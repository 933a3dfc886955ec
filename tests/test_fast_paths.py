"""Fast paths are exact: prompt-prefix sharing gives the unshared rewards, loss and gradients;
LoRA on the top blocks adapts exactly those blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from perlhf.data import PreferenceDataModule
from perlhf.losses import pairwise_loss
from perlhf.models import LoraSpec, ModelConfig, build_causal_lm
from perlhf.modules import PPOModule, RewardModule
from perlhf.modules.policy import POLICY, active_adapter, adapters_disabled, merged_lora
from perlhf.packing import CHOSEN, GROUP_PAD, PAD, PREFIX, REJECTED, pack_groups, pack_pairs
from perlhf.tiny import save_tiny


def test_pack_pairs_by_hand() -> None:
    # Pair 0 shares [5, 6]; in pair 1 the chosen sequence is a prefix of the rejected one, so the
    # shared part stops one token short of its end (each tail keeps the token its reward is read at).
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0], [5, 6, 9, 0], [1, 2, 3, 0]])
    mask = (torch.arange(4) < torch.tensor([4, 2, 3, 3])[:, None]).long()
    packed = pack_pairs(ids, mask, pad_token_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 2, 3, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    P, C, R = PREFIX, CHOSEN, REJECTED
    assert packed.segments.tolist() == [[P, P, C, C, R], [P, C, R, R, PAD]]
    assert packed.rows.tolist() == [0, 1, 0, 1]  # chosen rows, then rejected rows
    assert packed.ends.tolist() == [3, 1, 4, 3]
    assert (packed.tokens, packed.unshared_tokens) == (9, 12)
    allowed = packed.attention_mask()[:, 0]
    assert allowed[0].long().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the rejected tail sees the prefix and itself, not the chosen tail
    ]
    assert allowed[1, 3].long().tolist() == [1, 0, 1, 1, 0]
    additive = packed.attention_mask(torch.float32)[0, 0]
    assert additive[4, 2] == torch.finfo(torch.float32).min and additive[4, 1] == 0


def test_pack_pairs_computes_each_answer_of_a_prompt_once() -> None:
    # Three answers A, B, C to the prompt [1, 2] make three pairs: (A, B), (A, C), (C, B).
    a, b, c = [1, 2, 3], [1, 2, 4, 5], [1, 2, 6]
    rows = [a, a, c, b, c, b]  # chosen rows, then rejected rows
    ids = torch.tensor([r + [0] * (4 - len(r)) for r in rows])
    mask = (ids != 0).long()
    packed = pack_pairs(ids, mask, pad_token_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 6, 4, 5]]  # prefix, then A, C, B once each
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 2, 3]]
    assert packed.segments.tolist() == [[PREFIX, PREFIX, 1, 2, 3, 3]]
    assert packed.rows.tolist() == [0] * 6
    assert packed.ends.tolist() == [2, 2, 3, 5, 3, 5]
    assert (packed.tokens, packed.unshared_tokens) == (6, 20)
    allowed = packed.attention_mask()[0, 0]
    assert allowed[5].long().tolist() == [1, 1, 0, 0, 1, 1]  # B's last token: prefix and B only

    # (A, C) and (B, D) share no answer: one row each, unless the prompt lengths say they share it.
    d = [1, 2, 7]
    ids = torch.tensor([a, b[:3], c, d])
    mask = torch.ones_like(ids)
    assert pack_pairs(ids, mask, 0).input_ids.shape[0] == 2
    joined = pack_pairs(ids, mask, 0, prompt_lengths=torch.tensor([2, 2]))
    assert joined.input_ids.tolist() == [[1, 2, 3, 4, 6, 7]]  # A, B[:3], C, D in order of appearance
    assert joined.ends.tolist() == [2, 3, 4, 5]


def test_pack_pairs_reads_either_padding_side() -> None:
    right = torch.tensor([[5, 6, 7, 0], [5, 6, 9, 8]])
    left = torch.tensor([[0, 5, 6, 7], [5, 6, 9, 8]])
    masks = (torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    a, b = (pack_pairs(ids, mask, pad_token_id=0) for ids, mask in zip((right, left), masks, strict=True))
    assert a.input_ids.tolist() == b.input_ids.tolist() == [[5, 6, 7, 9, 8]]
    assert a.position_ids.tolist() == b.position_ids.tolist() == [[0, 1, 2, 2, 3]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama") / "m", arch="llama", pretrain_steps=0)


def _reward_modules(model_dir: Path, attn: str) -> tuple[RewardModule, RewardModule]:
    modules = []
    for share in (False, True):
        config = ModelConfig(
            name_or_path=str(model_dir),
            attn_implementation=attn,
            disable_dropout=True,  # GPT-2 trains with dropout; both paths must see the same network
            lora=LoraSpec(r=4, dropout=0.0, target_modules="all-linear"),
        )
        module = RewardModule(config, share_prefix=share)
        module.configure_model()
        modules.append(module)
    torch.manual_seed(0)
    for p in modules[0].model.parameters():  # adapters away from B = 0, so gradients flow
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    return modules[0], modules[1]


@pytest.mark.parametrize(
    "arch,attn,grouped",
    [("gpt2", "sdpa", False), ("llama", "sdpa", False), ("llama", "eager", False), ("llama", "sdpa", True)],
)
def test_shared_prefix_equals_unshared(
    arch: str, attn: str, grouped: bool, tiny_model_dir: Path, tiny_llama: Path, preference_dir: Path
) -> None:
    model_dir = tiny_model_dir if arch == "gpt2" else tiny_llama
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = PreferenceDataModule(
        path="json",
        data_files=files,
        tokenizer=str(model_dir),
        max_length=64,
        batch_size=8,
        max_train_samples=64 if grouped else 16,
        max_val_samples=8,
        group_by_prompt=grouped,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    plain, shared = _reward_modules(model_dir, attn)
    results = []
    for module in (plain, shared):
        chosen, rejected = module.pair_rewards(batch)
        loss = pairwise_loss(chosen, rejected)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((chosen.detach(), rejected.detach(), loss.detach(), grads))
    (c0, r0, l0, g0), (c1, r1, l1, g1) = results
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and any(".lora_B." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(c0, r0)  # the two halves really are different sequences
    pad = data.tokenizer.pad_token_id
    packed = pack_pairs(batch["input_ids"], batch["attention_mask"], pad, batch["prompt_lengths"])
    assert packed.tokens < 0.9 * packed.unshared_tokens  # the prompts were computed once
    # Pairs of one prompt share a row; grouped batches hold the pairs of one or two prompts.
    rows = zip(batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], strict=False)
    prompts = {tuple(row[m.bool()][:n].tolist()) for row, m, n in rows}  # the chosen rows' prompts
    assert packed.input_ids.shape[0] == len(prompts) and (len(prompts) <= 2 or not grouped)


def test_share_prefix_refuses_flash_attention(tiny_llama: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_llama), attn_implementation="sdpa")
    module = RewardModule(config, share_prefix=True)
    module.configure_model()
    module._sequence_classifier().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="share_prefix needs attention that takes a 4D mask"):
        module._check_packable()


def test_lora_top_layers(tiny_llama: Path) -> None:
    def adapted_blocks(layers: int | list[int] | None) -> set[int]:
        config = ModelConfig(
            name_or_path=str(tiny_llama), lora=LoraSpec(target_modules="all-linear", layers=layers)
        )
        model = build_causal_lm(config)
        return {
            int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if ".lora_A." in n
        }

    blocks = len(adapted_blocks(None))
    assert adapted_blocks(1) == {blocks - 1}
    assert blocks >= 2 and adapted_blocks([0]) == {0}
    with pytest.raises(ValueError, match="model.lora.layers=99"):
        adapted_blocks(99)
    with pytest.raises(ValueError, match="block indices"):
        adapted_blocks([blocks])


def test_shared_prefix_trains_through_trainer(
    tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    from helpers import quiet_trainer

    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, dropout=0.0))
    module = RewardModule(
        config, share_prefix=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0)
    )
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = PreferenceDataModule(path="json", data_files=files, max_length=64, batch_size=32)
    trainer = quiet_trainer(tmp_path, max_steps=60, limit_val_batches=2, val_check_interval=60)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    assert 0.3 < float(logged["train/packed_token_fraction"]) < 0.9  # the prompts were computed once
    assert float(logged["train/loss"]) < 0.69  # below chance (log 2): it learned
    assert float(logged["val/accuracy"]) > 0.6


def _lora_policy(model_dir: Path, **lora: Any) -> PPOModule:
    """A PPOModule whose policy adapter is away from B = 0, so merging changes the weights."""
    spec = LoraSpec(r=4, dropout=0.0, target_modules="all-linear", **lora)
    module = PPOModule(ModelConfig(name_or_path=str(model_dir), disable_dropout=True, lora=spec))
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_" in name and f".{POLICY}." in name:
                p.normal_(0, 0.2)
    return module


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # GPT-2: Conv1D weights stored transposed
def test_merged_generation_is_exact(arch: str, tiny_model_dir: Path, tiny_llama: Path) -> None:
    module = _lora_policy(tiny_model_dir if arch == "gpt2" else tiny_llama)
    policy = module.policy.eval()
    frozen = {n: (p, p.detach().clone(), p.requires_grad) for n, p in policy.named_parameters()}
    ids = torch.randint(3, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as rollouts have
    with torch.no_grad(), active_adapter(policy, POLICY):
        unmerged = policy(input_ids=ids, attention_mask=mask).logits
        with merged_lora(policy) as merged:
            folded = policy(input_ids=ids, attention_mask=mask).logits
        with adapters_disabled(policy):
            base = policy(input_ids=ids, attention_mask=mask).logits
    assert merged
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(folded, unmerged, atol=1e-5, rtol=1e-5)  # ... and folding keeps it
    samples = []
    for merge in (False, True):
        module.merge_for_generation = merge
        torch.manual_seed(1)
        samples.append(module.generate(ids, mask, max_new_tokens=6, do_sample=True))
    assert torch.equal(samples[0], samples[1])
    for name, p in policy.named_parameters():  # the same parameter objects, bit-identical
        original, value, requires_grad = frozen[name]
        assert p is original and torch.equal(p, value) and p.requires_grad == requires_grad, name


def test_merged_generation_skips_dora(tiny_llama: Path) -> None:
    policy = _lora_policy(tiny_llama, use_dora=True).policy
    with active_adapter(policy, POLICY), merged_lora(policy) as merged:
        assert not merged


def test_pack_groups_by_hand() -> None:
    # Rows 0 and 2 share prompt [5, 6] (row 2 left-padded); row 1 has its own prompt [7].
    prompt_ids = torch.tensor([[5, 6], [0, 7], [5, 6]])
    prompt_mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    response_ids = torch.tensor([[8, 9, 2], [3, 0, 0], [4, 2, 0]])  # 2 = EOS, 0 = pad
    response_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    packed = pack_groups(prompt_ids, prompt_mask, response_ids, response_mask, pad_token_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 8, 9, 2, 4, 2], [7, 3, 0, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    G = GROUP_PAD
    assert packed.segments.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, G, G, G, G, G]]
    assert packed.rows.tolist() == [0, 1, 0]
    # token t of a response is predicted at the column before it (the prompt's last for t = 0);
    # columns past a response's end repeat its last predictor (masked out downstream)
    assert packed.predictors.tolist() == [[1, 2, 3], [0, 0, 0], [1, 5, 5]]
    assert (packed.tokens, packed.unshared_tokens) == (9, 15)
    allowed = packed.attention_mask()[0, 0].long()
    assert allowed[5].tolist() == [1, 1, 0, 0, 0, 1, 0]  # response 2 sees the prompt, not response 1


def _rollout_batch(module: PPOModule, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rollout-shaped batch: 3 prompts of different lengths (left-padded), ``k`` responses each
    of different lengths (right-padded after EOS), rows shuffled so groups are not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    pad, eos = module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    prompts = [torch.randint(3, 60, (n,), generator=gen) for n in (5, 3, 4)]
    width_p, width_r = 5, 6
    rows = []
    for prompt in prompts:
        for j in range(k):
            length = 2 + (j * 3 + len(prompt)) % (width_r - 1)
            response = torch.randint(3, 60, (length,), generator=gen)
            response[-1] = eos
            rows.append((prompt, response))
    order = torch.randperm(len(rows), generator=gen).tolist()
    rows = [rows[i] for i in order]
    batch = {
        "prompt_ids": torch.full((len(rows), width_p), pad),
        "prompt_mask": torch.zeros(len(rows), width_p, dtype=torch.long),
        "response_ids": torch.full((len(rows), width_r), pad),
        "response_mask": torch.zeros(len(rows), width_r, dtype=torch.long),
    }
    for i, (prompt, response) in enumerate(rows):
        batch["prompt_ids"][i, width_p - len(prompt) :] = prompt
        batch["prompt_mask"][i, width_p - len(prompt) :] = 1
        batch["response_ids"][i, : len(response)] = response
        batch["response_mask"][i, : len(response)] = 1
    return batch


@pytest.mark.parametrize("arch,attn", [("gpt2", "sdpa"), ("llama", "sdpa"), ("llama", "eager")])
def test_shared_prompt_equals_unshared(arch: str, attn: str, tiny_model_dir: Path, tiny_llama: Path) -> None:
    model_dir = tiny_model_dir if arch == "gpt2" else tiny_llama
    modules = []
    for share in (False, True):
        spec = LoraSpec(r=4, dropout=0.0, target_modules="all-linear")
        config = ModelConfig(
            name_or_path=str(model_dir), attn_implementation=attn, disable_dropout=True, lora=spec
        )
        module = PPOModule(config, algorithm="ppo", share_prompt=share)
        module.configure_model()
        modules.append(module)
    torch.manual_seed(0)
    for p in modules[0].parameters():  # policy and value adapters and the value head away from 0
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    modules[1].load_state_dict(modules[0].state_dict())
    batch = _rollout_batch(modules[0], k=3)
    mask = batch["response_mask"].bool()
    idx = torch.arange(len(batch["prompt_ids"]))
    outs, grads = [], []
    for module in modules:
        module.sampling_temperature = 0.7
        out = module._forward(batch, idx, with_values=True)
        ref = module.reference_logprobs(batch, idx)
        loss = (
            (out["logprobs"] + out["values"]) * mask
        ).sum() / mask.sum()  # a per-token mean, like the losses
        loss.backward()
        outs.append((out["logprobs"][mask], out["values"][mask], ref[mask]))
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert modules[1]._packing and not modules[0]._packing
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)
