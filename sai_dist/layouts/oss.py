r"""Layout for fairscale's ``OSS`` (optimizer-state sharding), with or without
``ShardedDataParallel``.

OSS partitions the *whole parameters* of the model over the ranks of its group and builds
one inner optimizer per rank, ``optim(partition_parameters()[rank], **defaults)``, that
steps only the parameters that rank owns; OSS then broadcasts each owner's parameters to
everyone. So each rank's SGD-SaI sees some blocks, each whole, and its gradient already
averaged over the data-parallel ranks (by DDP's all-reduce or ShardedDataParallel's
reduce to the owner).

The block index space is *every* parameter of the OSS, in OSS's own global order
(``chain(g["params"] for g in oss.param_groups)``, the same on every rank, the order
OSS's ``state_dict`` indexes by). A rank contributes a whole-block piece for each
parameter it owns, and the existing batched two-pass reduction sums over OSS's group, so
after step 1 every rank holds the moments of every block of every rank: the normalising
max is global with no extra collective (still two ``all_reduce`` in all).

Blocks whose first gradient arrives after step 1 are fresh on their owner only; they are
whole there, so their statistics need no other rank (:attr:`OSSLayout.late_group` is
``None``) and the max fixed at step 1 scales them.

Nothing here imports fairscale: the OSS object is read by attribute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch.distributed as dist
from torch import Tensor

from sai_dist.layouts.base import Layout, LayoutError, Origin, refuse_flat_params
from sai_dist.stats import Piece

__all__ = ["OSSLayout"]


class OSSLayout(Layout):
    """Blocks are all parameters of an ``OSS`` optimizer; this rank steps those it owns.

    Args:
        oss: the ``fairscale.optim.OSS`` whose inner optimizer this layout serves. Read
            lazily, so parameter groups OSS gains later (``add_param_group``) extend the
            block space on every rank alike.
    """

    def __init__(self, oss: Any) -> None:
        super().__init__()
        self.oss = oss
        self._index: dict[int, int] = {}
        self._params: list[Tensor] = []

    # -- block space -----------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.oss.param_groups))

    def _refresh_index(self) -> None:
        params = self._all_params()
        if len(params) != len(self._params):
            self._params = params
            self._index = {id(p): i for i, p in enumerate(params)}

    @property
    def group(self) -> dist.ProcessGroup | None:  # type: ignore[override]
        return self.oss.group

    ranks_hold_different_params = True

    def signature(self) -> list[object]:
        # Every rank knows every OSS parameter, owned or not.
        self._refresh_index()
        return [tuple(p.shape) for p in self._params]

    @property
    def late_group(self) -> dist.ProcessGroup | None:
        # A late block is fresh on its owner only, held whole there with a reduced gradient.
        return None

    @property
    def num_blocks(self) -> int:
        self._refresh_index()
        return len(self._params)

    def block_of(self, param: Tensor) -> int | None:
        self._refresh_index()
        return self._index.get(id(param))

    # -- Layout contract -------------------------------------------------------------

    def register(self, params: Sequence[Tensor]) -> None:
        for p in params:
            refuse_flat_params(p)
            if self.block_of(p) is None:
                raise LayoutError(
                    f"SGDSaI (inside fairscale OSS) was given a tensor of shape {tuple(p.shape)} that is not "
                    "among the OSS optimizer's parameters."
                )

    def pieces(self, param: Tensor) -> Sequence[Piece]:
        block = self.block_of(param)
        if block is None:
            raise LayoutError(
                f"SGDSaI is stepping a tensor of shape {tuple(param.shape)} that its OSS optimizer does "
                "not hold."
            )
        # Only the owner steps (and so contributes) a block: counted once over the group.
        return (Piece(block),)

    def element_origin(self, param: Tensor) -> list[Origin] | None:
        # Each stepped tensor is one whole parameter.
        return [Origin(param.numel(), 0)]

    def block_eps(self, eps: Tensor) -> Tensor:
        # Every rank must compute the same g-SNR for every block (the max is over all of
        # them), so other ranks' blocks take the eps of their OSS param group too.
        eps = eps.clone()
        for b, group in self._group_of_blocks():
            if math.isnan(float(eps[b])):
                eps[b] = group["eps"]
        return eps

    def _group_of_blocks(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for group in self.oss.param_groups:
            for p in group["params"]:
                b = self.block_of(p)
                if b is not None and "eps" in group:
                    out.append((b, group))
        return out

    # -- g-SNR table (sai_dist.table) --------------------------------------------------

    @property
    def table_group(self) -> dist.ProcessGroup | None:
        # Each rank stores the g-SNR of the blocks it owns; one all_reduce (MAX) over OSS's
        # group assembles the whole table, so every rank calls it together (like
        # consolidate_state_dict). Rows: the default, by parameter identity (block_of).
        return self.group

    def describe(self, param: Tensor) -> str:
        return f"tensor of shape {tuple(param.shape)} (OSS block {self.block_of(param)})"
