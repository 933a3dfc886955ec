"""Memory switches with LoRA and full fine-tuning: gradient checkpointing (same gradients, really
recomputing), Trainer precisions, and QLoRA (validation and clear errors on CPU; a real 4-bit
build and training step on a CUDA GPU)."""

from __future__ import annotations

import sys
import types
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from perlhf.data import PreferenceDataModule, RolloutDataModule, synthetic
from perlhf.models import (
    LoraSpec,
    ModelConfig,
    _load_kwargs,
    build_causal_lm,
    build_reward_model,
    checkpointing_in_eval,
)
from perlhf.modules import PPOModule, RewardModule
from perlhf.modules.policy import frozen_causal_lm, hf_model
from perlhf.modules.rl_config import PPOSpec

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
NO_DROPOUT = LoraSpec(r=4, alpha=8, dropout=0.0)


def config(model_dir: Path, finetune: str = "lora", **kwargs) -> ModelConfig:
    return ModelConfig(name_or_path=str(model_dir), finetune=finetune, lora=NO_DROPOUT, **kwargs)


def checkpointing_on(model: nn.Module) -> bool:
    hf = hf_model(model)
    return (
        hf.is_activation_checkpointing
        if hasattr(hf, "is_activation_checkpointing")
        else hf.is_gradient_checkpointing
    )


class BlockCalls:
    """Counts forward calls of the first transformer block's MLP, i.e. of code inside the
    checkpointed region: once per forward, plus once more per backward when it is recomputed."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        hf_model(model).base_model.h[0].mlp.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.count += 1


def left_padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


def grads_and_calls(build, cfg: ModelConfig, ids: torch.Tensor, mode: str = "train"):
    torch.manual_seed(0)
    model = build(cfg)
    getattr(model, mode)()
    calls = BlockCalls(model)
    torch.manual_seed(1)  # same dropout masks in both runs (checkpointing replays the RNG state)
    out = model(input_ids=ids, attention_mask=left_padded(ids))
    forward_calls = calls.count
    (out.logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, grads, forward_calls, calls.count - forward_calls


BUILDERS = {
    "reward": lambda cfg: build_reward_model(cfg, pad_token_id=1),
    "causal_lm": lambda cfg: build_causal_lm(cfg),
}


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("kind", ["reward", "causal_lm"])
def test_checkpointing_recomputes_and_gives_the_same_gradients(
    kind: str, finetune: str, tiny_model_dir: Path
) -> None:
    ids = torch.randint(2, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    build = BUILDERS[kind]
    plain, expected, _, plain_recomputed = grads_and_calls(build, config(tiny_model_dir, finetune), ids)
    cfg = config(tiny_model_dir, finetune, gradient_checkpointing=True)
    model, grads, forward_calls, recomputed = grads_and_calls(build, cfg, ids)

    assert not checkpointing_on(plain) and checkpointing_on(model)
    assert hf_model(model).config.resid_pdrop > 0, "dropout is on: the replayed RNG state is tested too"
    assert forward_calls == 1 and plain_recomputed == 0
    assert recomputed == 1, "the checkpointed block must be recomputed in the backward pass"
    # Non-reentrant checkpointing: the checkpoint function carries use_reentrant=False.
    block = hf_model(model).base_model.h[0]
    assert block._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert set(grads) == set(expected) and grads
    if finetune == "lora":
        assert all("lora_" in n or "score" in n for n in grads)
    for name, grad in expected.items():
        if "lora_A" not in name:  # lora_A's grad is exactly zero at init (lora_B = 0)
            assert grad.abs().sum() > 0 or name.endswith("ln_f.bias"), f"{name} got no gradient"
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_in_eval_recomputes_without_dropout(tiny_model_dir: Path) -> None:
    """Eval mode (as PPOModule trains) skips checkpointing in transformers; the context manager
    turns it back on for the checkpointed layers only, with the same gradients."""
    ids = torch.randint(2, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    cfg = config(tiny_model_dir, gradient_checkpointing=True)
    _, expected, _, recomputed_eval = grads_and_calls(build_causal_lm, cfg, ids, mode="eval")
    assert recomputed_eval == 0, "transformers keeps every activation in eval mode"

    torch.manual_seed(0)
    model = build_causal_lm(cfg).eval()
    calls = BlockCalls(model)
    with checkpointing_in_eval(model):
        block = hf_model(model).base_model.h[0]
        assert block.training and not block.attn.training and not block.mlp.dropout.training
        # use_cache is on (as in PPO's forwards): the body must drop the KV cache too, or the
        # recomputed block appends its keys a second time and attention sees twice the length.
        logits = model(input_ids=ids, attention_mask=left_padded(ids), use_cache=True).logits
        (logits.float() ** 2).mean().backward()
    assert calls.count == 2, "forward + recompute"
    assert not any(m.training for m in model.modules()), "flags restored on exit"
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- precision
class Record(L.Callback):
    """Snapshots parameters when training starts (after the precision plugin converted them),
    records the loss of each step and the dtype the score head computes in."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.head_dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
        head = hf_model(module.model).score
        if hasattr(head, "modules_to_save"):  # peft's trainable copy of the head under LoRA
            head = head.modules_to_save["default"]
        head.register_forward_hook(lambda m, i, out: self.head_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_reward_fit_under_each_cpu_precision(
    precision: str, finetune: str, tiny_model_dir: Path, preference_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = RewardModule(
        config(tiny_model_dir, finetune), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)
    )
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = PreferenceDataModule(
        path="json",
        data_files=files,
        tokenizer=str(tiny_model_dir),
        max_length=48,
        batch_size=8,
        max_train_samples=32,
    )
    record = Record()
    trainer = quiet_trainer(
        tmp_path, max_steps=3, limit_val_batches=0, precision=precision, callbacks=[record]
    )
    trainer.fit(module, datamodule=data)

    assert len(record.losses) == 3 and all(map(torch.isfinite, torch.tensor(record.losses)))
    half = precision.startswith("bf16")
    assert record.head_dtypes == {torch.bfloat16 if half else torch.float32}
    assert {p.dtype for p in record.trainable.values()} == {
        torch.bfloat16 if precision == "bf16-true" else torch.float32
    }
    params = dict(module.named_parameters())
    changed = {n for n, before in record.trainable.items() if not torch.equal(params[n], before)}
    if finetune == "lora":
        assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)
        for name, before in record.frozen.items():
            assert torch.equal(params[name], before), f"frozen backbone tensor {name} changed"
    else:
        assert not record.frozen
        assert "model.transformer.h.0.attn.c_attn.weight" in changed and "model.score.weight" in changed
    # ln_f.bias shifts chosen and rejected rewards alike: zero gradient under the pairwise loss.
    # (Under bf16-true the lr must beat bf16 rounding: ~1e-4 steps vanish on weights near 1.)
    assert changed == set(record.trainable) - {"model.transformer.ln_f.bias"}


def test_16_mixed_falls_back_to_bf16_mixed_on_cpu(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        trainer = quiet_trainer(tmp_path, precision="16-mixed")
    assert trainer.precision == "bf16-mixed"


# ----------------------------------------------------------------------------- PPO
@pytest.fixture(scope="module")
def ppo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short REINFORCE run (LoRA, value adapter) under bf16-mixed with checkpointing on."""
    root = tmp_path_factory.mktemp("ppo-memory")
    torch.manual_seed(0)
    reward = RewardModule(config(tiny_model_dir))
    reward.configure_model()
    reward_dir = reward.save_pretrained(root / "reward")  # untrained: any scores will do here
    prompts = synthetic.write_jsonl(synthetic.prompts(64, seed=2), root / "prompts.jsonl")

    module = PPOModule(
        config(tiny_model_dir, gradient_checkpointing=True),
        algorithm="reinforce",
        ppo=PPOSpec(epochs=1, minibatch_size=8),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    calls = BlockCalls(module.policy)
    in_backward = {"calls": 0, "backwards": 0}
    backward = module.manual_backward

    def counting_backward(loss: torch.Tensor, *args, **kwargs) -> None:
        before = calls.count
        backward(loss, *args, **kwargs)
        in_backward["calls"] += calls.count - before
        in_backward["backwards"] += 1

    module.manual_backward = counting_backward
    data = RolloutDataModule(
        path=str(prompts),
        reward_model=str(reward_dir),
        val_fraction=0.1,
        prompts_per_rollout=8,
        samples_per_prompt=2,
        rollouts_per_epoch=2,
        max_new_tokens=8,
    )
    quiet_trainer(root, max_epochs=1, limit_val_batches=0, precision="bf16-mixed").fit(
        module, datamodule=data
    )
    return {"module": module, "frozen": frozen, "trained": trained, **in_backward}


def test_ppo_under_bf16_mixed_with_checkpointing_trains_only_adapters(ppo_run: dict) -> None:
    module = ppo_run["module"]
    assert checkpointing_on(module.policy)
    # 2 rollouts x 16 sequences / minibatch 8, each minibatch backpropagated in two passes (policy
    # loss, then value loss: PPOModule._split_backward).
    assert ppo_run["backwards"] == 8
    params = dict(module.named_parameters())
    for name, before in ppo_run["frozen"].items():
        assert torch.equal(params[name], before), f"backbone tensor {name} changed"
    changed = {n for n, before in ppo_run["trained"].items() if not torch.equal(params[n], before)}
    assert any(".lora_B.policy" in n for n in changed) and any(".lora_B.value" in n for n in changed)
    assert "value_head.weight" in changed
    assert all(torch.isfinite(p).all() for p in params.values())


def test_ppo_updates_recompute_checkpointed_blocks(ppo_run: dict) -> None:
    assert ppo_run["calls"] > 0, "no block was recomputed during PPO backward passes"


# ----------------------------------------------------------------------------- QLoRA
def test_quantization_config_validation() -> None:
    with pytest.raises(ValueError, match=r"quantization='4bit' does not work with finetune: full"):
        ModelConfig(name_or_path="x", finetune="full", quantization="4bit")
    with pytest.raises(ValueError, match=r"model.quantization must be one of \['none', '4bit', '8bit'\]"):
        ModelConfig(name_or_path="x", quantization="3bit")
    with pytest.raises(ValueError, match="model.quantization_compute_dtype must be one of"):
        ModelConfig(name_or_path="x", quantization="4bit", quantization_compute_dtype="int8")
    cfg = ModelConfig(name_or_path="x", quantization="8bit", quantization_compute_dtype="float16")
    assert ModelConfig.coerce(asdict(cfg)) == cfg
    assert ModelConfig.coerce({"name_or_path": "x"}).quantization == "none"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_quantization_without_cuda_raises_a_clear_error(tiny_model_dir: Path) -> None:
    cfg = config(tiny_model_dir, quantization="4bit")
    message = r"model.quantization='4bit' needs a CUDA GPU \(bitsandbytes\); use quantization: none on CPU"
    for build in (
        lambda: build_reward_model(cfg, pad_token_id=1),
        lambda: build_causal_lm(cfg),
        lambda: frozen_causal_lm(cfg, str(tiny_model_dir)),  # a separate reference policy
        lambda: PPOModule(cfg, algorithm="reinforce", ppo=PPOSpec(epochs=1)).configure_model(),
    ):
        with pytest.raises(ValueError, match=message):
            build()


def test_quantization_without_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ValueError, match=r'needs the bitsandbytes package: pip install "perlhf\[qlora\]"'):
        _load_kwargs(ModelConfig(name_or_path="x", quantization="4bit"))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_load_arguments(quantization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What from_pretrained receives with CUDA and bitsandbytes present (faked here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    kwargs = _load_kwargs(ModelConfig(name_or_path="x", quantization=quantization))
    assert kwargs["device_map"] == {"": 3}
    q = kwargs["quantization_config"]
    if quantization == "4bit":
        assert q.load_in_4bit and not q.load_in_8bit
        assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
        assert q.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert q.load_in_8bit and not q.load_in_4bit
    assert "quantization_config" not in _load_kwargs(ModelConfig(name_or_path="x"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_4bit_reward_model_and_policy_train(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from perlhf.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "llama", arch="llama", hidden_size=128, num_layers=2, pretrain_steps=0)
    cfg = ModelConfig(
        name_or_path=str(model_dir), quantization="4bit", gradient_checkpointing=True, lora=NO_DROPOUT
    )
    device = torch.device("cuda", torch.cuda.current_device())
    ids = torch.randint(8, 500, (4, 16), device=device)
    mask = torch.ones_like(ids)

    reward = build_reward_model(cfg, pad_token_id=1).train()
    policy = build_causal_lm(cfg).train()
    for model, head in ((reward, "score"), (policy, None)):
        hf = hf_model(model)
        q_proj = hf.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
        assert isinstance(hf.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in n for n in trainable) and all(
            p.dtype == torch.float32 for p in trainable.values()
        )
        if head:
            assert any("score" in n for n in trainable)
            assert not isinstance(hf.score.modules_to_save["default"], bnb.nn.Linear4bit)
        assert all(p.device == device for p in model.parameters())
        before = {n: p.detach().clone() for n, p in trainable.items()}
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = (
            (logits**2).mean()
            if head
            else torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
        )
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        assert any("lora_B" in n and not torch.equal(p, before[n]) for n, p in trainable.items())

    reference = frozen_causal_lm(cfg, str(model_dir))
    assert isinstance(reference.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_disable_dropout_makes_training_mode_forwards_deterministic(
    tiny_model_dir: Path, finetune: str
) -> None:
    ids = torch.randint(10, 300, (4, 24))
    outputs = {}
    for off in (False, True):
        model = build_reward_model(config(tiny_model_dir, finetune, disable_dropout=off), pad_token_id=1)
        model.train()
        hf = hf_model(model)
        dropouts = [m.p for n, m in hf.named_modules() if isinstance(m, nn.Dropout) and "lora_" not in n]
        assert dropouts and (all(p == 0.0 for p in dropouts) if off else any(p > 0 for p in dropouts))
        with torch.no_grad():
            outputs[off] = [model(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(*outputs[False])  # the tiny GPT-2 is configured with dropout 0.1
    assert torch.equal(*outputs[True])


def test_reward_model_forward_builds_no_kv_cache(tiny_model_dir: Path) -> None:
    """A reward model never generates: its forward must not copy keys and values into a cache
    (GPT-2 and Llama configs default to ``use_cache=True``)."""
    model = build_reward_model(config(tiny_model_dir), pad_token_id=1)
    out = model(input_ids=torch.randint(10, 300, (2, 16)))
    assert getattr(out, "past_key_values", None) is None
