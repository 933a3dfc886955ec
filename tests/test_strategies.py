"""Scale-out overlays and the LoRA-aware FSDP wrap policy.

Every ``configs/scale/`` overlay composes with the reward and RL recipes and parses under the
project's LightningCLI (nothing instantiated, so no GPU or DeepSpeed is needed); the wrap policy
puts every block and every trainable leaf in its own unit, never mixing trainable and frozen
parameters, as torch's FSDP really wraps them (CPU, gloo: one process, and two with FULL_SHARD).
The fit on a GPU runs where there is one.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType

from perlhf.cli import cli_main
from perlhf.models import LoraSpec, ModelConfig
from perlhf.modules import PPOModule, RewardModule
from perlhf.modules.rl_config import PPOSpec
from perlhf.strategies import (
    HFDeepSpeedStrategy,
    fsdp_strategy,
    fsdp_units,
    gathered_params,
    is_transformer_block,
    lora_wrap_policy,
)
from perlhf.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]
SCALE = sorted((REPO / "configs" / "scale").glob("*.yaml"))
RECIPES = [
    REPO / "configs" / "hh-rlhf" / "reward.yaml",
    REPO / "configs" / "hh-rlhf" / "rl.yaml",
    REPO / "configs" / "quickstart" / "reward.yaml",
]


# ------------------------------------------------------------------ overlays parse and compose


@pytest.fixture
def parse_only(monkeypatch: pytest.MonkeyPatch):
    """``cli_main`` as shipped, stopping after parsing: no model, data or Trainer is built."""
    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)

    def parse(*configs: Path):
        args = [a for config in configs for a in ("--config", str(config))]
        return cli_main(args, run=False).config

    return parse


def _same(parsed, expected) -> bool:
    if callable(parsed) and isinstance(expected, str):  # a dotted path resolved to the object
        return f"{parsed.__module__}.{parsed.__qualname__}" == expected
    if hasattr(parsed, "name") and isinstance(expected, str):  # enums, e.g. ShardingStrategy
        return parsed.name == expected
    return parsed == expected


def test_overlays_exist() -> None:
    names = {p.name for p in SCALE}
    assert {
        "1gpu.yaml",
        "1gpu-qlora.yaml",
        "2gpu-ddp.yaml",
        "8gpu-ddp.yaml",
        "8gpu-fsdp.yaml",
        "8gpu-deepspeed-zero2.yaml",
        "8gpu-deepspeed-zero3.yaml",
    } <= names
    for path in SCALE:
        text = path.read_text()
        assert text.startswith("# "), f"{path.name}: explain use, cost and when to pick it in a header"
        keys = set(yaml.safe_load(text))
        assert keys <= {"trainer", "model"}, f"{path.name} sets {keys}: overlays touch trainer/model only"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
@pytest.mark.parametrize("overlay", SCALE, ids=lambda p: p.name)
def test_overlay_composes_with_recipe(overlay: Path, recipe: Path, parse_only) -> None:
    base = yaml.safe_load(recipe.read_text())
    layer = yaml.safe_load(overlay.read_text())
    config = parse_only(recipe, overlay)

    for key, value in layer.get("trainer", {}).items():
        parsed = config.trainer[key]
        if isinstance(value, dict):  # strategy: class_path + init_args
            assert parsed.class_path == value["class_path"]
            for arg, expected in value.get("init_args", {}).items():
                assert _same(parsed.init_args[arg], expected), (arg, parsed.init_args[arg])
        else:
            assert parsed == value, (key, parsed)

    model = config.model.init_args.model
    overrides = layer.get("model", {}).get("init_args", {}).get("model", {})
    for key, value in overrides.items():
        assert model[key] == value, (key, model[key])
    # The recipe's own settings survive the overlay.
    assert config.model.class_path == base["model"]["class_path"]
    assert model.lora.r == base["model"]["init_args"]["model"]["lora"]["r"]
    if "name_or_path" not in overrides:
        assert model.name_or_path == base["model"]["init_args"]["model"]["name_or_path"]
    if "RolloutDataModule" in base["data"]["class_path"]:
        assert config.data.init_args.reward_model == base["data"]["init_args"]["reward_model"]
    if "logger" in base["trainer"]:
        assert config.trainer.logger.init_args.name == base["trainer"]["logger"]["init_args"]["name"]


def test_model_and_hardware_overlays_stack(parse_only) -> None:
    config = parse_only(
        RECIPES[1], REPO / "configs/scale/qwen2.5-7b.yaml", REPO / "configs/scale/8gpu-fsdp.yaml"
    )
    assert config.model.class_path == "perlhf.modules.PPOModule"
    assert config.model.init_args.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert config.model.init_args.model.gradient_checkpointing is True
    assert config.trainer.devices == 8
    assert config.trainer.strategy.init_args.auto_wrap_policy is lora_wrap_policy


def test_yaml_fsdp_strategy_matches_fsdp_strategy(parse_only) -> None:
    config = parse_only(RECIPES[0], REPO / "configs/scale/8gpu-fsdp.yaml")
    init = {k: v for k, v in config.trainer.strategy.init_args.items() if v is not None}
    from_yaml, from_python = FSDPStrategy(**init), fsdp_strategy()
    for strategy in (from_yaml, from_python):
        assert strategy.kwargs["auto_wrap_policy"] is lora_wrap_policy
        assert strategy.kwargs["use_orig_params"] is True
        assert strategy.kwargs.get("limit_all_gathers", True) is True  # torch's default
        assert strategy._state_dict_type == "full"
    assert from_yaml.sharding_strategy == from_python.sharding_strategy


def test_zero3_overlay_uses_the_transformers_aware_strategy(parse_only) -> None:
    config = parse_only(RECIPES[0], REPO / "configs/scale/8gpu-deepspeed-zero3.yaml")
    assert config.trainer.strategy.class_path == "perlhf.strategies.HFDeepSpeedStrategy"
    assert config.trainer.strategy.init_args.stage == 3
    assert config.trainer.strategy.init_args.exclude_frozen_parameters is True
    assert issubclass(HFDeepSpeedStrategy, DeepSpeedStrategy)


# ------------------------------------------------------------------ the wrap policy


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight tiny GPT-2 and Llama (tied embeddings) in from_pretrained layout."""
    root = tmp_path_factory.mktemp("tiny-arch")
    return {arch: save_tiny(root / arch, arch=arch, pretrain_steps=0) for arch in ("gpt2", "llama")}


def _config(path: Path, finetune: str = "lora") -> ModelConfig:
    return ModelConfig(name_or_path=str(path), finetune=finetune, lora=LoraSpec(r=4, alpha=8, dropout=0.0))


def _module(kind: str, path: Path, finetune: str = "lora") -> L.LightningModule:
    module = (
        RewardModule(_config(path, finetune))
        if kind == "reward"
        else PPOModule(_config(path, finetune), algorithm="reinforce", ppo=PPOSpec(epochs=1))
    )
    module.configure_model()
    return module


def _blocks(module: nn.Module) -> set[str]:
    """Block names from the HF models' own ``_no_split_modules`` (not the policy's logic)."""
    classes = {c for m in module.modules() for c in (getattr(m, "_no_split_modules", None) or ())}
    return {name for name, m in module.named_modules() if type(m).__name__ in classes}


def _check_units(module: nn.Module, units: dict[str, list[str]]) -> None:
    params = dict(module.named_parameters())
    flat = [name for names in units.values() for name in names]
    assert sorted(flat) == sorted(params), "every parameter in exactly one unit"
    for unit, names in units.items():
        kinds = {params[name].requires_grad for name in names}
        assert len(kinds) == 1, f"unit {unit!r} mixes trainable and frozen parameters: {names}"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["reward", "ppo"])
def test_policy_wraps_blocks_and_trainable_leaves(kind: str, arch: str, tiny_dirs: dict[str, Path]) -> None:
    module = _module(kind, tiny_dirs[arch])
    units = fsdp_units(module)
    _check_units(module, units)

    blocks = _blocks(module)
    assert len(blocks) == 2 and blocks <= set(units)
    assert {n for n, m in module.named_modules() if is_transformer_block(m)} == blocks
    lora = {n for n, _ in module.named_modules() if n.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"])}
    adapters = 1 if kind == "reward" else 2  # PPO: the policy and value adapters
    targets = {"gpt2": 2, "llama": 4}[arch]
    assert len(lora) == 2 * targets * 2 * adapters and lora <= set(units)
    head = "model.base_model.model.score.modules_to_save.default" if kind == "reward" else "value_head"
    assert head in units
    assert set(units) == blocks | lora | {head, ""}, "nothing else becomes a unit"
    # peft's frozen base layers (Linear, or GPT-2's Conv1D) and the score head's frozen original
    frozen = [n for n, _ in module.named_modules() if n.endswith((".base_layer", ".original_module"))]
    assert len(frozen) >= 2 * targets and not set(frozen) & set(units)
    params = dict(module.named_parameters())
    assert not any(params[n].requires_grad for n in units[""]), "the root unit holds frozen weights only"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_policy_under_full_finetuning(arch: str, tiny_dirs: dict[str, Path]) -> None:
    reward = _module("reward", tiny_dirs[arch], "full")
    assert set(fsdp_units(reward)) == _blocks(reward) | {""}, "all trainable: blocks only"

    # Full fine-tuning RL: a trainable policy and critic beside a frozen reference. Trainable
    # leaves get units, but a tied weight (input embedding = LM head) stays in a unit enclosing
    # every module that uses it, or FSDP would free it between its users' forwards.
    ppo = _module("ppo", tiny_dirs[arch], "full")
    units = fsdp_units(ppo)
    _check_units(ppo, units)
    assert _blocks(ppo) <= set(units)
    by_name = dict(ppo.named_parameters(remove_duplicate=False))
    unit_of = {id(by_name[name]): unit for unit, names in units.items() for name in names}
    holders: dict[int, list[str]] = {}
    for name, m in ppo.named_modules():
        for param in m.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    tied = {pid: names for pid, names in holders.items() if len(names) > 1}
    assert tied, "the tiny models tie their input embeddings to the LM head"
    for pid, names in tied.items():
        unit = unit_of[pid]
        assert all(unit == "" or n == unit or n.startswith(unit + ".") for n in names), (unit, names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _real_units(root: FSDP) -> list[tuple[frozenset[int], set[bool]]]:
    units = []
    for unit in FSDP.fsdp_modules(root):
        if unit._handle is not None:
            params = unit._handle.flat_param._params
            units.append((frozenset(id(p) for p in params), {p.requires_grad for p in params}))
    return units


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["reward", "ppo"])
def test_fsdp_wraps_as_predicted(kind: str, arch: str, tiny_dirs: dict[str, Path], gloo_group) -> None:
    module = _module(kind, tiny_dirs[arch])
    ids = {name: id(p) for name, p in module.named_parameters()}
    predicted = {frozenset(ids[n] for n in names) for names in fsdp_units(module).values()}

    wrapped = FSDP(
        module, auto_wrap_policy=lora_wrap_policy, use_orig_params=True, device_id=torch.device("cpu")
    )
    real = _real_units(wrapped)
    assert {params for params, _ in real} == predicted
    assert all(len(kinds) == 1 for _, kinds in real), "a flat param mixes trainable and frozen"

    if kind == "reward":
        input_ids = torch.randint(3, 100, (4, 12))
        wrapped(input_ids, torch.ones_like(input_ids)).sum().backward()
        for unit in FSDP.fsdp_modules(wrapped):
            if unit._handle is not None:
                flat = unit._handle.flat_param
                assert (flat.grad is not None) == flat.requires_grad, "frozen units carry no gradient"


# ------------------------------------------------------------------ two ranks, FULL_SHARD (CPU)


def _two_rank_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        fsdp = {
            "auto_wrap_policy": lora_wrap_policy,
            "use_orig_params": True,
            "device_id": torch.device("cpu"),
        }
        # A reward-model update through the root forward, as Lightning's training_step runs.
        reward = _module("reward", Path(model_dir))
        before = {n: p.detach().clone() for n, p in reward.named_parameters() if p.requires_grad}
        wrapped = FSDP(reward, **fsdp)
        assert wrapped.sharding_strategy.name == "FULL_SHARD"
        assert all(len(kinds) == 1 for _, kinds in _real_units(wrapped))
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        input_ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(rank))
        wrapped(input_ids, torch.ones_like(input_ids)).sum().backward()
        for unit in FSDP.fsdp_modules(wrapped):
            if unit._handle is not None:
                flat = unit._handle.flat_param
                assert (flat.grad is not None) == flat.requires_grad, "frozen units carry no gradient"
        optimizer.step()
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
            state = wrapped.state_dict()  # collective; the frozen units are in it too
        moved = [n for n, p in before.items() if not torch.equal(state[n], p)]

        # Sampling outside the root forward (the RL rollout) needs whole parameters.
        ppo = _module("ppo", Path(model_dir))
        sharded = FSDP(ppo, **fsdp)
        strategy = FSDPStrategy()
        strategy.model = sharded
        prompt = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        with gathered_params(SimpleNamespace(strategy=strategy)):
            response = ppo.generate(prompt, torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
        if rank == 0:
            torch.save(
                {"keys": sorted(state), "trainable": sorted(before), "moved": moved, "response": response},
                out,
            )
    finally:
        dist.destroy_process_group()


def test_two_ranks_full_shard(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        _two_rank_worker, args=(_free_port(), str(tiny_dirs["llama"]), str(out)), nprocs=2
    )
    result = torch.load(out, weights_only=True)
    assert len(result["keys"]) > len(result["trainable"]) > 0
    assert sorted(result["moved"]) == result["trainable"], "every trainable tensor updated"
    assert result["response"].shape == (2, 3)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_fsdp_fit_on_gpu(tiny_model_dir: Path, preference_dir: Path, tmp_path: Path) -> None:
    """A short reward-model fit under perlhf's FSDP strategy, bf16, on one GPU. (On one device FSDP
    runs NO_SHARD, whose full state dicts drop frozen units in torch's FSDP: no checkpoints here.)"""
    from perlhf.data import PreferenceDataModule

    module = RewardModule(
        _config(tiny_model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    )
    files = {"train": str(preference_dir / "train.jsonl"), "test": str(preference_dir / "val.jsonl")}
    data = PreferenceDataModule(
        path="json", data_files=files, tokenizer=str(tiny_model_dir), max_length=64, batch_size=32
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=fsdp_strategy(),
        precision="bf16-mixed",
        max_steps=150,
        limit_val_batches=4,
        val_check_interval=150,
        check_val_every_n_epoch=None,  # 150 steps outlast the 125-batch epoch
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)

    wrapped = trainer.strategy.model
    assert isinstance(wrapped, FSDP)
    units = _real_units(wrapped)
    assert len(units) > 4 and all(len(kinds) == 1 for _, kinds in units)
    assert trainer.callback_metrics["val/accuracy"] >= 0.65  # chance: 0.5
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
