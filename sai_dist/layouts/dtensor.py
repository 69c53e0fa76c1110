r"""Layout for DTensor parameters: FSDP2 (``fully_shard``), HSDP, tensor parallel.

Each DTensor parameter is one block of the original model; on every rank its *local
tensor* (the rank's shard, possibly uneven, possibly empty) is one piece of that block.

Statistics are summed over one process group covering the parameters' device meshes
(meshes sliced from one root mesh, as TP x FSDP2 x PP build them, are combined as
:mod:`sai_dist.layouts.mesh` describes: copies along root dims a mesh does not cover are
counted once, and root dims no mesh covers hold other pipeline stages, reached by
:attr:`DTensorLayout.model_group` for the whole-model normaliser). A mesh
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

import math
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sai_dist.layouts.base import Layout, LayoutError, Origin, refuse_flat_params
from sai_dist.layouts.mesh import MeshGeometry, box_group, mesh_ranks, root_of
from sai_dist.stats import Piece


class DTensorLayout(Layout):
    """Each parameter is one block; a DTensor's local shard is its piece on this rank.

    DTensor parameters may live on any meshes sliced from one root mesh (see
    :mod:`sai_dist.layouts.mesh`): statistics are summed over the box of root dims their
    meshes cover, and the normaliser is a max over the whole root mesh
    (:attr:`model_group`) when other dims hold other pipeline stages. Meshes that are not
    slices of one root are accepted only when they all span the same ranks (several
    meshes built over the whole world).
    """

    def __init__(self) -> None:
        super().__init__()
        self._block_of: dict[int, int] = {}
        self._pieces: dict[int, tuple[Piece, ...]] = {}
        # Keep the tensors alive so their ids stay unique for the layout's lifetime.
        self._tensors: list[Tensor] = []
        self._ranks: tuple[int, ...] | None = None
        self._mesh: DeviceMesh | None = None
        self._roots: list[DeviceMesh] = []
        self._meshes: dict[int, DeviceMesh] = {}
        self._geometry: MeshGeometry | None = None
        self._span: frozenset[int] = frozenset()
        self._group: dist.ProcessGroup | None = None
        self._model_group: dist.ProcessGroup | None = None

    # -- process group -------------------------------------------------------------

    @property
    def group(self) -> dist.ProcessGroup | None:  # type: ignore[override]
        """The group covering every mesh the parameters live on (``None`` outside a
        process group, where every tensor is whole and local)."""
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = self._resolve_group()
        return self._group

    @property
    def model_group(self) -> dist.ProcessGroup | None:
        """Every rank of the root mesh when some of its dims hold other pipeline stages
        (dims no parameter mesh covers), for the whole-model normaliser; else ``None``."""
        _ = self.group  # resolving the group resolves the model group too
        return self._model_group

    def _resolve_group(self) -> dist.ProcessGroup:
        world = dist.get_world_size()
        geometry = self._geometry
        if geometry is not None:
            root = geometry.root
            ranks = geometry.box(self._span)
            # Root dims no parameter mesh covers hold other pipeline stages (or replicas).
            if any(root.mesh.shape[d] > 1 for d in range(root.ndim) if d not in self._span):
                self._model_group = box_group(root, frozenset(range(root.ndim)), geometry.ranks)
            return box_group(root, self._span, ranks)
        if self._ranks is None or len(self._ranks) == world:
            return dist.group.WORLD  # type: ignore[return-value]
        mesh = self._mesh
        assert mesh is not None
        if mesh.ndim == 1:
            return mesh.get_group()
        raise LayoutError(
            f"SGDSaI: DTensor parameters live on {mesh.ndim}-D device meshes over ranks {list(self._ranks)}, "
            f"a subset of the {world}-rank world, that are not slices of one root mesh. Slice every mesh "
            "from one init_device_mesh(...) (mesh['dp', 'tp']) or pass a layout."
        )

    def uncovered_stages(self, ranks: Sequence[int]) -> list[tuple[int, ...]] | None:
        """Coordinates along the root dims no parameter mesh covers (the pipeline stages)
        that none of ``ranks`` has: a ``pipeline_group`` over ``ranks`` would leave those
        stages out of the normaliser. Empty when the parameters are not on one root."""
        geometry = self._geometry
        if geometry is None:
            return []
        shape = geometry.root.mesh.shape
        other = [d for d in range(geometry.root.ndim) if d not in self._span and shape[d] > 1]
        if not other:
            return []
        every = {tuple(c[d] for d in other) for c in geometry.coords.values()}
        held = {tuple(geometry.coords[r][d] for d in other) for r in ranks if r in geometry.coords}
        return sorted(every - held)

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
        ranks = mesh_ranks(mesh)
        root = root_of(mesh)
        roots = self._roots if any(r is root for r in self._roots) else [*self._roots, root]
        if len(roots) == 1:
            geometry = self._geometry if self._geometry is not None else MeshGeometry(root)
            try:
                covered = geometry.covered(mesh)
            except ValueError as e:
                raise LayoutError(f"SGDSaI cannot map {self.describe(p)}: its {e}.") from None
            self._geometry, self._span = geometry, self._span | covered
        elif (self._ranks is not None and ranks != self._ranks) or self._geometry_spans_other(ranks):
            first = self._ranks if self._ranks is not None else ranks
            raise LayoutError(
                "SGDSaI was given DTensor parameters on device meshes over different ranks "
                f"({list(first)} and {list(ranks)}, the latter for {self.describe(p)}) that are not "
                "slices of one root mesh. Build every mesh from one init_device_mesh(...) and slice it "
                "(world['dp', 'tp'], world['dp']), so the statistics can be summed over their union."
            )
        else:
            self._geometry = None  # several roots over the same ranks: the legacy one-group path
        self._roots = roots
        self._meshes[id(p)] = mesh
        if self._ranks is None:
            self._ranks, self._mesh = ranks, mesh
        self._pieces.clear()  # counted flags depend on the span
        self._group = None  # re-resolved lazily with the new mesh
        self._model_group = None

    def _geometry_spans_other(self, ranks: tuple[int, ...]) -> bool:
        """Whether the meshes seen so far, within one root, cover ranks other than ``ranks``."""
        geometry = self._geometry
        return geometry is not None and geometry.box(self._span) != ranks

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

    def element_origin(self, param: Tensor) -> list[Origin] | None:
        # The local shard is a contiguous run of the flattened parameter when only dim 0 is
        # sharded (FSDP2, HSDP): it starts at its global row offset. Other shardings
        # (tensor parallel on dim 1) scatter it, so no single offset exists.
        if not isinstance(param, DTensor):
            return [Origin(param.numel(), 0)]
        if any(isinstance(pl, Shard) and pl.dim != 0 for pl in param.placements):
            return None
        if sum(isinstance(pl, Shard) for pl in param.placements) > 1:
            return None
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        row = math.prod(param.shape[1:]) if param.dim() > 1 else 1
        return [Origin(param.numel(), offset[0] * row if param.dim() else 0)]

    def _counted(self, param: Tensor) -> bool:
        geometry = self._geometry
        if not isinstance(param, DTensor):
            # Replicated on every rank of the group: count one copy.
            if geometry is not None:
                return all(geometry.here[d] == 0 for d in self._span)
            return self._rank_in_group() == 0
        coordinate = param.device_mesh.get_coordinate()
        assert coordinate is not None  # checked at registration
        pairs = zip(coordinate, param.placements, strict=True)
        if not all(c == 0 for c, pl in pairs if isinstance(pl, Replicate)):
            return False
        if geometry is None:
            return True
        # Root dims of the span that the parameter's mesh does not cover hold copies of it.
        covered = geometry.covered(param.device_mesh)
        return all(geometry.here[d] == 0 for d in self._span - covered)

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
