"""The statistics engine against torch.std / torch.linalg.norm on whole tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sai_dist.gsnr import block_gsnr, max_gsnr, normaliser
from sai_dist.stats import Piece, reduce_block_moments
from tests.support.ranks import run_ranks
from tests.unit.stats_ranks import make_blocks, moments_on_rank, random_split


def _expected(blocks):
    norm = torch.stack([torch.linalg.norm(b.double()) for b in blocks])
    # torch.std of a 1-element tensor is NaN (and warns); so is the engine's
    std = torch.stack([b.double().std() if b.numel() > 1 else torch.tensor(math.nan) for b in blocks])
    return norm, std


def _assert_rel(actual, expected, tol=1e-6):
    for a, e in zip(actual.tolist(), expected.tolist(), strict=True):
        if math.isnan(e):
            assert math.isnan(a)
        else:
            assert abs(a - e) <= tol * max(abs(e), 1e-30), (a, e)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_in_process_match_whole_tensor_statistics(world, seed):
    blocks = make_blocks(seed)
    sources = [s for rank in random_split(blocks, world, seed) for s in rank]
    m = reduce_block_moments(sources, len(blocks), None)
    norm, std = _expected(blocks)
    _assert_rel(m.norm, norm)
    _assert_rel(m.std, std)
    assert m.count.tolist() == [b.numel() for b in blocks]


def test_two_pass_survives_large_mean_where_one_pass_fails():
    x = (1e4 + torch.randn(100_000, generator=torch.Generator().manual_seed(0))).float()
    m = reduce_block_moments([(x, [Piece(0)])], 1, None)
    truth = x.double().std().item()
    assert abs(m.std.item() - truth) / truth < 1e-6
    # The one-pass formula in fp32, for contrast: no correct digit left.
    n = x.numel()
    one_pass = ((x.square().sum() - x.sum() ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
    assert abs(one_pass - truth) / truth > 1e-2


def test_uncounted_replica_and_empty_pieces_contribute_nothing():
    x = torch.randn(20)
    sources = [
        (x, [Piece(0)]),
        (x, [Piece(0, counted=False)]),
        (torch.empty(0), [Piece(1)]),
        (torch.randn(4), [Piece(0, (2, 2))]),
    ]
    m = reduce_block_moments(sources, 2, None)
    _assert_rel(m.norm[:1], torch.linalg.norm(x.double()).reshape(1))
    assert m.count.tolist() == [20.0, 0.0]


def test_gsnr_and_normaliser_follow_the_formula():
    blocks = make_blocks(3)
    m = reduce_block_moments([(b, [Piece(i)]) for i, b in enumerate(blocks)], len(blocks), None)
    g = block_gsnr(m, 1e-8, "official")
    for i, b in enumerate(blocks):
        std = b.double().std().nan_to_num() if b.numel() > 1 else 0.0
        expected = (torch.linalg.norm(b.double()) / (std + 1e-8)).item()
        assert g.raw[i].item() == pytest.approx(expected, rel=1e-6)
    assert normaliser(max_gsnr(g), True) == pytest.approx(g.value.max().item())
    assert normaliser(max_gsnr(g), False) == 1.0
    policy = block_gsnr(m, 1e-8, "max")
    assert policy.degenerate.tolist() == [False, True, False, True, False, False]
    regular_max = max(g.raw[i].item() for i in (0, 2, 4, 5))
    assert policy.value[1].item() == pytest.approx(regular_max)
    assert max_gsnr(policy) == pytest.approx(regular_max)
    late = block_gsnr(m, 1e-8, "max", fill=123.0)
    assert late.value[1].item() == 123.0 and late.value[3].item() == 123.0


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_pieces_across_gloo_ranks_match_whole_tensor_statistics(world):
    seed = 11
    results = run_ranks(moments_on_rank, world, seed)
    blocks = make_blocks(seed)
    blocks.append(torch.randn(50, generator=torch.Generator().manual_seed(seed + 1)))
    norm, std = _expected(blocks)
    for r in results:
        _assert_rel(r["norm"], norm)
        _assert_rel(r["std"], std)
        assert r["collectives"] == 2  # one batched all_reduce per pass, whatever the block count
    for r in results[1:]:
        # bitwise identical on every rank (the 1-element block's NaN std included)
        torch.testing.assert_close(r["norm"], results[0]["norm"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(r["std"], results[0]["std"], rtol=0, atol=0, equal_nan=True)
