r"""Geometry of device meshes sliced from one root mesh (FSDP2 x TP x PP, as torchtitan
builds them), for the DTensor layout.

A world mesh ``R`` of shape :math:`(d_0, \dots, d_{k-1})` (say ``("pp", "dp", "tp")``) is
sliced into the meshes parameters live on: ``R["dp", "tp"]`` for tensor-parallel linears
sharded by FSDP2, ``R["dp"]`` for norms, flattened dims such as ``dp_shard_cp``. Each such
sub-mesh ``M`` holding this rank *covers* the root dims along which its ranks vary; it is
the box of ranks that share this rank's root coordinate on every other dim.

For the statistics of one optimizer the layout needs

* the *span* :math:`S` = the union of the dims covered by its parameters' meshes: the
  block moments are summed over the box of :math:`S` through this rank (one group);
* for a parameter on ``M``, whether this rank's copy is counted: a root dim in :math:`S`
  that ``M`` does not cover holds identical copies of it (a norm on ``R["dp"]`` is
  repeated on every ``tp`` rank), so only coordinate 0 along it counts, exactly as for a
  ``Replicate`` placement on ``M``'s own dims;
* the *other* dims :math:`R \setminus S` (``pp``): ranks along them hold other pipeline
  stages (or replicas, for which a max changes nothing), so the normaliser is a max over
  every rank of ``R``.

Process groups: a box that is one root dim uses the mesh's own group; the whole world uses
``WORLD``; any other box (``dp x tp`` inside a ``pp`` stage) gets a group created once, at
the first step, by the box's ranks only (``use_local_synchronization``), and cached, so
several optimizers (model parts) share it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MeshGeometry", "box_group", "covered_dims"]

_GROUPS: dict[tuple[int, tuple[int, ...]], dist.ProcessGroup] = {}


def root_of(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``mesh`` was sliced (or flattened) from; itself for a root mesh."""
    getter = getattr(mesh, "_get_root_mesh", None)
    return getter() if getter is not None else mesh


def mesh_ranks(mesh: DeviceMesh) -> tuple[int, ...]:
    """The global ranks of ``mesh``, sorted."""
    return tuple(sorted(mesh.mesh.flatten().tolist()))


def _indices(shape: torch.Size) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in shape:
        out = [(*t, i) for t in out for i in range(n)]
    return out


Coords = dict[int, tuple[int, ...]]


def covered_dims(root: DeviceMesh, ranks: Iterable[int], coords: Coords) -> frozenset[int]:
    """Root dims along which ``ranks`` vary."""
    points = [coords[r] for r in ranks]
    return frozenset(d for d in range(root.ndim) if len({p[d] for p in points}) > 1)


def box(root: DeviceMesh, dims: frozenset[int], here: tuple[int, ...], coords: Coords) -> tuple[int, ...]:
    """The ranks sharing ``here``'s root coordinate on every dim outside ``dims``."""
    fixed = [d for d in range(root.ndim) if d not in dims]
    return tuple(sorted(r for r, c in coords.items() if all(c[d] == here[d] for d in fixed)))


def box_group(root: DeviceMesh, dims: frozenset[int], ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """A process group over ``ranks``, the box of ``dims`` through this rank: the root's own
    group for one dim, ``WORLD`` for the whole world, else a group made (once, by these
    ranks only) and cached."""
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD  # type: ignore[return-value]
    if len(dims) == 1:
        return root.get_group(next(iter(dims)))
    key = (id(dist.group.WORLD), ranks)
    group = _GROUPS.get(key)
    if group is None:
        group = dist.new_group(list(ranks), use_local_synchronization=True)
        _GROUPS[key] = group
    return group


class MeshGeometry:
    """The root mesh of a set of DTensor meshes, and this rank's place in it."""

    def __init__(self, root: DeviceMesh) -> None:
        self.root = root
        self.coords = {r: c for r, c in zip(_flat_ranks(root), _indices(root.mesh.shape), strict=True)}
        here = root.get_coordinate()
        assert here is not None
        self.here = tuple(here)
        self._covered: dict[int, frozenset[int]] = {}

    def covered(self, mesh: DeviceMesh) -> frozenset[int]:
        """Root dims ``mesh`` covers. Raises ``ValueError`` if ``mesh`` is not the box of
        those dims through this rank (a mesh with ranks picked otherwise)."""
        key = id(mesh)
        got = self._covered.get(key)
        if got is None:
            ranks = mesh_ranks(mesh)
            got = covered_dims(self.root, ranks, self.coords)
            if box(self.root, got, self.here, self.coords) != ranks:
                raise ValueError(f"device mesh over ranks {list(ranks)} is not a slice of its root mesh")
            self._covered[key] = got
        return got

    def box(self, dims: frozenset[int]) -> tuple[int, ...]:
        return box(self.root, dims, self.here, self.coords)

    @property
    def ranks(self) -> tuple[int, ...]:
        return mesh_ranks(self.root)


def _flat_ranks(root: DeviceMesh) -> list[int]:
    return [int(r) for r in root.mesh.flatten().tolist()]
