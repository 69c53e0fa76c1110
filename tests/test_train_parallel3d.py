"""The job's 3-D degree checks and stage split (sai_dist.train.parallel3d); no processes."""

from __future__ import annotations

import pytest

from sai_dist.train.parallel3d import Degrees, check_degrees, stage_blocks


def test_degrees_leave_the_rest_to_fsdp2() -> None:
    assert check_degrees(8, tp=2, pp=2, n_heads=4, n_layers=4) == Degrees(pp=2, dp=2, tp=2)
    assert check_degrees(4, tp=2, pp=1, n_heads=4, n_layers=1) == Degrees(pp=1, dp=2, tp=2)
    assert check_degrees(4, tp=1, pp=4, n_heads=3, n_layers=4) == Degrees(pp=4, dp=1, tp=1)


@pytest.mark.parametrize(
    ("world", "tp", "pp", "heads", "layers", "match"),
    [
        (6, 2, 2, 4, 4, "world size 6 is not divisible by --tp 2 x --pp 2 = 4"),
        (4, 4, 1, 6, 4, "--n-heads 6 is not divisible by --tp 4"),
        (4, 1, 4, 4, 3, "--n-layers 3 is fewer than --pp 4"),
        (4, 0, 1, 4, 4, "--tp must be an integer >= 1"),
        (4, 1, True, 4, 4, "--pp must be an integer >= 1"),
    ],
)
def test_bad_degrees_name_the_flag(world: int, tp: int, pp: int, heads: int, layers: int, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("+", r"\+")):
        check_degrees(world, tp=tp, pp=pp, n_heads=heads, n_layers=layers)


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
