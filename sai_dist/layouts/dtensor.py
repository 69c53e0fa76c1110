r"""Layout for DTensor parameters: FSDP2 (``fully_shard``), HSDP, tensor parallel.

Each DTensor parameter is one block of the original model; on every rank its *local
tensor* (the rank's shard, possibly uneven, possibly empty) is one piece of that block.

Statistics are summed over one process group covering the whole device mesh. A mesh
dimension on which the parameter is ``Shard``-ed partitions its elements, so summing the
shards across it counts every element once. A dimension on which it is ``Replicate``-d
(the replica dimension of HSDP, or a parameter that is not sharded at all) holds identical
copies, so only ranks at coordinate 0 of every such dimension count their piece:

.. math::
    \text{counted}(r) \iff \forall d:\ \text{placement}_d = \text{Replicate}
    \Rightarrow \text{coord}_d(r) = 0

and the sum over the mesh is then exactly the block's moments. Summing over the full mesh
instead of only the shard dimensions keeps step 1 at one batched ``all_reduce`` per pass
for the whole model, whatever mix of placements it has.

``Partial`` placements (pending reductions) are refused: a partial local tensor is not a
piece of the gradient. Plain (non-DTensor) parameters mixed in are taken as replicated
(every rank holds the whole block) and counted on group rank 0 only.

:meth:`DTensorLayout.local` returns the DTensor's local tensor, so the per-step arithmetic
runs on plain tensors and issues no collective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from sai_dist.layouts.base import Layout, LayoutError, refuse_flat_params
from sai_dist.stats import Piece


class DTensorLayout(Layout):
    """Each parameter is one block; a DTensor's local shard is its piece on this rank.

    All DTensor parameters must live on device meshes spanning the same set of ranks (the
    usual case: one FSDP2/HSDP mesh, or several meshes over the whole world). Statistics
    are summed over that set: the default group when it is the whole world, the mesh's own
    group for a 1-D sub-world mesh.
    """

    def __init__(self) -> None:
        super().__init__()
        self._block_of: dict[int, int] = {}
        self._pieces: dict[int, tuple[Piece, ...]] = {}
        # Keep the tensors alive so their ids stay unique for the layout's lifetime.
        self._tensors: list[Tensor] = []
        self._ranks: tuple[int, ...] | None = None
        self._mesh: DeviceMesh | None = None
        self._group: dist.ProcessGroup | None = None

    # -- process group -------------------------------------------------------------

    @property
    def group(self) -> dist.ProcessGroup | None:  # type: ignore[override]
        """The group covering every mesh the parameters live on (``None`` outside a
        process group, where every tensor is whole and local)."""
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = self._resolve_group()
        return self._group

    def _resolve_group(self) -> dist.ProcessGroup:
        world = dist.get_world_size()
        if self._ranks is None or len(self._ranks) == world:
            return dist.group.WORLD  # type: ignore[return-value]
        mesh = self._mesh
        assert mesh is not None
        if mesh.ndim == 1:
            return mesh.get_group()
        raise LayoutError(
            f"SGDSaI: DTensor parameters live on a {mesh.ndim}-D device mesh over ranks {list(self._ranks)}, "
            f"a subset of the {world}-rank world. Only meshes spanning the whole world, or 1-D meshes, are "
            "supported for the g-SNR reduction; build SGDSaI over a whole-world mesh or pass a layout."
        )

    def _rank_in_group(self) -> int:
        group = self.group
        if group is None:
            return 0
        return dist.get_rank(group)

    # -- registration --------------------------------------------------------------

    def register(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if id(p) in self._block_of:
                continue
            refuse_flat_params(p)
            if isinstance(p, DTensor):
                self._check_mesh(p)
            self._block_of[id(p)] = len(self._tensors)
            self._tensors.append(p)

    def _check_mesh(self, p: DTensor) -> None:
        mesh = p.device_mesh
        partial = [i for i, pl in enumerate(p.placements) if isinstance(pl, Partial)]
        if partial:
            raise LayoutError(
                f"SGDSaI cannot step {self.describe(p)}: it is Partial on mesh dim(s) {partial}, so its "
                "local tensor is an unreduced summand, not a piece of the parameter. Redistribute it to "
                "Shard or Replicate placements first."
            )
        if mesh.get_coordinate() is None:
            raise LayoutError(f"SGDSaI was given {self.describe(p)} on a device mesh without this rank.")
        ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
        if self._ranks is None:
            self._ranks, self._mesh = ranks, mesh
            self._pieces.clear()  # plain tensors' counted flag depends on the group
        elif ranks != self._ranks:
            raise LayoutError(
                "SGDSaI was given DTensor parameters on device meshes over different ranks "
                f"({list(self._ranks)} and {list(ranks)}, the latter for {self.describe(p)}). g-SNR "
                "statistics are reduced over one group; build one SGDSaI per mesh (e.g. per pipeline "
                "stage) instead."
            )
        self._group = None  # re-resolved lazily with the new mesh

    # -- mapping -------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._tensors)

    def signature(self) -> list[object]:
        # A DTensor's shape is its global shape: the same on every rank.
        return [tuple(t.shape) for t in self._tensors]

    def pieces(self, param: Tensor) -> Sequence[Piece]:
        cached = self._pieces.get(id(param))
        if cached is not None:
            return cached
        block = self._block_of.get(id(param))
        if block is None:
            raise LayoutError(
                f"SGDSaI is stepping {self.describe(param)} that it was never given: its param groups "
                "were rebound after g-SNR was fixed, or to tensors that are not model parameters. Build "
                "the optimizer from model.parameters() after fully_shard, or rebind before the first step."
            )
        pieces = (Piece(block, None, self._counted(param)),)
        self._pieces[id(param)] = pieces
        return pieces

    def _counted(self, param: Tensor) -> bool:
        if not isinstance(param, DTensor):
            # Replicated on every rank of the group: count one copy.
            return self._rank_in_group() == 0
        coordinate = param.device_mesh.get_coordinate()
        assert coordinate is not None  # checked at registration
        pairs = zip(coordinate, param.placements, strict=True)
        return all(c == 0 for c, pl in pairs if isinstance(pl, Replicate))

    def local(self, tensor: Tensor) -> Tensor:
        # Under no_grad (every optimizer step) to_local() is the local tensor itself, so
        # in-place updates reach the parameter and no collective is issued.
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def check_grad(self, param: Tensor) -> None:
        # The step runs on local tensors, so a gradient laid out differently from its
        # parameter would be misread: a Partial gradient's local tensor is an unreduced
        # summand (wrong g-SNR, replicas stepping apart), another sharding a shape mismatch.
        grad = param.grad
        if isinstance(param, DTensor) or isinstance(grad, DTensor):
            same = (
                isinstance(param, DTensor)
                and isinstance(grad, DTensor)
                and grad.device_mesh == param.device_mesh
                and tuple(grad.placements) == tuple(param.placements)
            )
            if not same:
                got = (
                    f"placements {tuple(grad.placements)}" if isinstance(grad, DTensor) else "a plain tensor"
                )
                raise LayoutError(
                    f"SGDSaI: the gradient of {self.describe(param)} has {got}, not the parameter's "
                    "placements on the same mesh; redistribute it (e.g. grad.redistribute(param.device_mesh, "
                    "param.placements)) before step()."
                )
        super().check_grad(param)

    def describe(self, param: Tensor) -> str:
        if isinstance(param, DTensor):
            return (
                f"DTensor of global shape {tuple(param.shape)}, placements {tuple(param.placements)}, "
                f"local shape {tuple(param.to_local().shape)}"
            )
        return f"tensor of shape {tuple(param.shape)}"
