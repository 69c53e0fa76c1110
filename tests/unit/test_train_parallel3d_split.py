"""The job's 3-D pieces that need no process group (sai_dist.train.parallel3d, the model's
``qkv="separate"`` form): degree and batch checks, the block-to-stage split, and that the
stage modules chained are the whole model with its parameter names."""

from __future__ import annotations

import pytest
import torch

from sai_dist.train.model import GPT, GPTConfig
from sai_dist.train.parallel3d import Degrees, check_batch, check_degrees, keep_stage, stage_blocks


def test_degrees_leave_the_rest_to_fsdp2() -> None:
    assert check_degrees(8, tp=2, pp=2, n_heads=4, n_layers=4) == Degrees(pp=2, dp=2, tp=2)
    assert check_degrees(4, tp=2, pp=1, n_heads=4, n_layers=1) == Degrees(pp=1, dp=2, tp=2)
    assert check_degrees(4, tp=1, pp=4, n_heads=3, n_layers=4) == Degrees(pp=4, dp=1, tp=1)


@pytest.mark.parametrize(
    ("world", "tp", "pp", "heads", "layers", "d_model", "match"),
    [
        (6, 2, 2, 4, 4, None, "world size 6 is not divisible by --tp 2 x --pp 2 = 4"),
        (4, 4, 1, 6, 4, None, "--n-heads 6 is not divisible by --tp 4"),
        (4, 4, 1, 2, 4, 30, "--d-model 30 is not divisible by --tp 4"),
        (4, 1, 4, 4, 3, None, "--n-layers 3 is fewer than --pp 4"),
        (4, 0, 1, 4, 4, None, "--tp must be an integer >= 1"),
        (4, 1, True, 4, 4, None, "--pp must be an integer >= 1"),
    ],
)
def test_bad_degrees_name_the_flag(
    world: int, tp: int, pp: int, heads: int, layers: int, d_model: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match.replace("+", r"\+")):
        check_degrees(world, tp=tp, pp=pp, n_heads=heads, n_layers=layers, d_model=d_model)


def test_batch_splits_into_equal_rows_and_microbatches() -> None:
    check_batch(8, dp=2, microbatches=2)
    with pytest.raises(ValueError, match="--global-batch 6 is not divisible by the data-parallel degree 4"):
        check_batch(6, dp=4, microbatches=1)
    with pytest.raises(ValueError, match="3 rows per data-parallel rank, not divisible by --microbatches 2"):
        check_batch(6, dp=2, microbatches=2)


@pytest.mark.parametrize(
    ("n", "pp", "sizes"), [(4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1])]
)
def test_stage_blocks_cover_every_block_once(n: int, pp: int, sizes: list[int]) -> None:
    ranges = stage_blocks(n, pp)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(n))


def test_stage_blocks_refuses_empty_stages() -> None:
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3"):
        stage_blocks(2, 3)


CFG = GPTConfig(n_layers=3, d_model=16, n_heads=2, seq_len=8)


def test_separate_qkv_computes_the_fused_attention() -> None:
    """q, k, v = the fused weight's row thirds gives the fused model's logits."""
    torch.manual_seed(0)
    fused = GPT(CFG)
    separate = GPT(GPTConfig(**{**CFG.__dict__, "qkv": "separate"}))
    state = {}
    for name, value in fused.state_dict().items():
        if ".attn.qkv." in name:
            for part, third in zip("qkv", value.chunk(3, dim=0), strict=True):
                state[name.replace(".qkv.", f".{part}.")] = third
        else:
            state[name] = value
    separate.load_state_dict(state)  # strict: the names are exactly these
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(separate(tokens), fused(tokens), rtol=1e-6, atol=1e-6)
    assert separate.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.3)  # same init rule


def test_separate_is_refused_unless_named() -> None:
    with pytest.raises(ValueError, match=r"GPTConfig\.qkv must be one of"):
        GPTConfig(qkv="split")


@pytest.mark.parametrize("pp", [2, 3])
def test_stages_chained_are_the_whole_model_with_its_names(pp: int) -> None:
    torch.manual_seed(0)
    whole = GPT(CFG)
    names = [n for n, _ in whole.named_parameters()]
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    want = whole(tokens)
    stages = []
    for s in range(pp):
        part = GPT(CFG)
        part.load_state_dict(whole.state_dict())
        stages.append(keep_stage(part, s, pp))
    x = tokens
    for part in stages:
        x = part(x)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    got = [n for part in stages for n, _ in part.named_parameters()]
    assert got == names  # every name once, in the whole model's order
    assert [n for n, _ in stages[0].named_parameters()][:2] == ["tok_emb.weight", "pos_emb.weight"]
    assert [n for n, _ in stages[-1].named_parameters()][-3:] == ["ln_f.weight", "ln_f.bias", "head.weight"]
