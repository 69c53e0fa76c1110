"""Measured validation: the optimizer-state bytes each rank really holds equal the
accounting's prediction (sai_dist.memory.accounting), byte for byte, padding included."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sai_dist.memory import OPTIMIZERS, buffer_elements, rank_memory
from sai_dist.memory.models import LlamaConfig, LlamaDecoder, NanoGPT, NanoGPTConfig, ViT, ViTConfig
from tests.distributed import memory_ranks
from tests.support.ranks import run_ranks

HAS_DTENSOR_LAYOUT = importlib.util.find_spec("sai_dist.layouts.dtensor") is not None
HAS_SAI_DEEPSPEED = importlib.util.find_spec("sai_dist.deepspeed") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _tiny_models():
    return [
        NanoGPT(NanoGPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=13, block_size=6)),
        LlamaDecoder(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, dim=8, intermediate=12, vocab_size=13)),
        ViT(ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=12, num_classes=3)),
    ]


def _batch(model):
    g = torch.Generator().manual_seed(0)
    if isinstance(model, ViT):
        return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2,), generator=g)
    return torch.randint(0, 13, (2, 6), generator=g), torch.randint(0, 13, (2, 6), generator=g)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("index", range(3), ids=["gpt", "llama", "vit"])
def test_single_process_state_bytes(kind, index):
    torch.manual_seed(0)
    model = _tiny_models()[index]
    opt = memory_ranks.make_optimizer(kind, model.parameters())
    for _ in range(2):
        model(*_batch(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    shapes = [tuple(p.shape) for p in model.parameters()]
    predicted = rank_memory(shapes, "single").state[kind]
    assert memory_ranks.state_bytes(opt, kind) == predicted
    assert predicted == OPTIMIZERS[kind] * 4 * sum(p.numel() for p in model.parameters())


def _check_fsdp2(results, kind):
    world = len(results)
    for r in results:
        shapes = r["shapes"]
        elements, _ = buffer_elements(shapes, "fsdp2", world, rank=r["rank"])
        assert r["state"] == OPTIMIZERS[kind] * 4 * elements, (kind, r)
        # the DTensor local shards are the unpadded rows; FSDP2 pads only its storage
        assert r["local_param_bytes"] == 4 * elements
    total = sum(torch.Size(s).numel() for s in results[0]["shapes"])
    assert sum(r["state"] for r in results) == OPTIMIZERS[kind] * 4 * total


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
def test_fsdp2_state_bytes_per_rank(kind):
    _check_fsdp2(run_ranks(memory_ranks.fsdp2_state, 2, kind, timeout=180), kind)


@pytest.mark.distributed
@pytest.mark.skipif(
    not HAS_DTENSOR_LAYOUT, reason="sai_dist.layouts.dtensor (FSDP2 layout, branch fsdp2) not merged"
)
def test_fsdp2_sgd_sai_state_bytes_per_rank():
    # The momentum buffer is a DTensor with the parameter's placements: 4 x local elements.
    _check_fsdp2(run_ranks(memory_ranks.fsdp2_state, 2, "sgd_sai", timeout=180), "sgd_sai")


def _check_zero(results, stage, kind, precision="fp32"):
    world = len(results)
    strategy = f"zero{stage}"
    for r in results:
        predicted = rank_memory(r["shapes"], strategy, world, precision)
        assert r["state"] == predicted.state[kind], (strategy, kind, r, predicted.buffer_elements)
        assert r["master"] == predicted.master, (strategy, r)


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_adamw_state_bytes_per_rank(stage):
    _check_zero(run_ranks(memory_ranks.zero_state, 2, stage, "adamw", timeout=300), stage, "adamw")


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_bf16_adamw_state_and_master_bytes_per_rank(stage):
    # bf16 weights, fp32 master partition and fp32 state: the bf16-mixed recipe.
    results = run_ranks(memory_ranks.zero_state, 2, stage, "adamw", "bf16-mixed", timeout=300)
    _check_zero(results, stage, "adamw", "bf16-mixed")


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.skipif(not HAS_SAI_DEEPSPEED, reason="sai_dist.deepspeed (ZeRO integration) not merged yet")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_sgd_sai_state_bytes_per_rank(stage):
    _check_zero(run_ranks(memory_ranks.zero_state, 2, stage, "sgd_sai", timeout=300), stage, "sgd_sai")
