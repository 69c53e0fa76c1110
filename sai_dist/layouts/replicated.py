"""Layout for tensors that are whole blocks on every rank: single process and DDP.

DDP all-reduces gradients before ``step()``, so every rank holds the full, identical
gradient of every block and g-SNR needs no communication at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from sai_dist.layouts.base import Layout, LayoutError, Origin, refuse_flat_params
from sai_dist.stats import Piece


class ReplicatedLayout(Layout):
    """Each stepped tensor is exactly one whole block."""

    group = None

    def __init__(self) -> None:
        super().__init__()
        # The one piece of each tensor (its block: its place in _tensors), built once:
        # pieces() is asked per tensor per step.
        self._pieces_of: dict[int, tuple[Piece]] = {}
        # Keep the tensors alive so their ids stay unique for the layout's lifetime.
        self._tensors: list[Tensor] = []

    def register(self, params: Sequence[Tensor]) -> None:
        for p in params:
            refuse_flat_params(p)
            if id(p) not in self._pieces_of:
                self._pieces_of[id(p)] = (Piece(len(self._tensors)),)
                self._tensors.append(p)

    @property
    def num_blocks(self) -> int:
        return len(self._tensors)

    def signature(self) -> list[object]:
        return [tuple(t.shape) for t in self._tensors]

    def pieces(self, param: Tensor) -> Sequence[Piece]:
        pieces = self._pieces_of.get(id(param))
        if pieces is None:
            raise LayoutError(
                f"SGDSaI is stepping a tensor of shape {tuple(param.shape)} that it was never given. "
                "Its param groups were rebound either to tensors that are not model parameters (a "
                "sharding wrapper's flat partitions: their g-SNR is not the g-SNR of the model's "
                "parameters; attach SGDSaI through that wrapper's integration, e.g. "
                "`import sai_dist.deepspeed`), or after g-SNR was fixed (rebind before the first step)."
            )
        return pieces

    def element_origin(self, param: Tensor) -> list[Origin] | None:
        # Each stepped tensor is one whole parameter.
        return [Origin(param.numel(), 0)]
