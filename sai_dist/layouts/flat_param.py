r"""Flat-parameter layouts: FSDP1 and fairscale's FullyShardedDataParallel.

Both wrappers concatenate the parameters of a wrapped module into one flat 1-D tensor,
pad it, and give every rank of the sharding group one contiguous slice. What a rank steps
is therefore a run of *segments* of original parameters plus padding, exactly the
situation of DeepSpeed's ZeRO partitions, so this module only reads each wrapper's
metadata into :class:`~sai_dist.layouts.flat_segment.Segment`\ s and reuses
:class:`~sai_dist.layouts.flat_segment.FlatSegmentLayout` for everything else (statistics over
the sharding group, padding in no segment, per-block element counts from the metadata).

**FSDP1** (``torch.distributed.fsdp.FullyShardedDataParallel``). Every unit's
``FlatParameter`` carries ``_shard_param_infos``: per original parameter ``i`` whether
this rank's shard holds part of it (``in_shard``), where that part starts in the shard
(``offset_in_shard``), how long it is (``numel_in_shard``) and where it starts inside the
parameter (``intra_param_start_idx``). Alignment padding between parameters and the end
padding of the last shard are in no entry. Element counts come from ``_shapes``.

* ``use_orig_params=False``: the optimizer steps the sharded ``FlatParameter``; its
  segments are ``[offset, offset + numel)`` for each parameter in the shard.
* ``use_orig_params=True``: the optimizer steps the original parameters, each a 1-D view
  ``flat[offset : offset + numel]`` of the shard (size 0 on ranks that hold none of it);
  one segment ``[0, numel)`` starting at ``intra_param_start_idx``, or none.
* Statistics are summed over the unit's ``process_group``: the whole world for
  ``FULL_SHARD``/``SHARD_GRAD_OP``, the intra-node shard group for ``HYBRID_SHARD`` (the
  replicas hold identical, already all-reduced copies, so each computes the same sums),
  and no group for ``NO_SHARD`` (every rank holds everything).

**fairscale** (``fairscale.nn.FullyShardedDataParallel``, 0.4.x). Each managed
parameter (a ``FlatParameter`` when ``flatten_parameters=True``, else each original
parameter) is sharded by ``_shard_parameters_``: rank ``r`` of ``W`` keeps
``flatten(p).chunk(W)[r]`` zero-padded to the length ``c = ceil(N / W)`` of chunk 0, i.e.
elements ``[min(r c, N), min((r + 1) c, N))`` of the ``N = p._orig_size.numel()`` real
ones. A ``FlatParameter`` lays its originals end to end (``_param_numels``,
``_param_shapes``, names from ``_param_infos``); anything else is one parameter.

Blocks are numbered in the model's parameter order (owning module in ``model.modules()``
order, then registration order), so :func:`sai_dist.gsnr_table` lists rows as
``model.named_parameters()`` of the unwrapped model would. The table is gathered with a
small ``all_reduce`` (MAX) over the sharding group on every call: call it on every rank.

Nothing here imports either wrapper: the builders read attributes (duck typing). The one
exception: building the FSDP1 layout wraps FSDP1's ``_optim_state_dict_impl``
(:func:`guard_fsdp1_optim_state_dict`) so that FSDP1's own optimizer state dict refuses
SGD-SaI state it would misread instead of failing inside a collective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sai_dist import momentum as lowp
from sai_dist.layouts.base import LayoutError
from sai_dist.layouts.flat_segment import FlatSegmentLayout, Segment, segments_in_range
from sai_dist.names import unwrapped_name, unwrapped_path

__all__ = [
    "FlatParamLayout",
    "flat_param_layout",
    "from_fairscale_fsdp",
    "from_fsdp1",
    "guard_fsdp1_optim_state_dict",
]


class FlatParamLayout(FlatSegmentLayout):
    """A :class:`FlatSegmentLayout` whose blocks are the original parameters of an
    FSDP1 or fairscale FSDP model, in the model's order, named by their unwrapped FQN.

    :func:`sai_dist.gsnr_table` is collective over :attr:`group` on every call (every rank
    must call it): a rank only holds the g-SNR of the blocks its shards touch.
    """

    #: The module the layout was built from; block names are relative to it.
    root: nn.Module | None = None
    #: The modules of :attr:`root` that own parameters the wrapper flattened away, for
    #: :mod:`sai_dist.names` (their ``_parameters`` no longer say so).
    param_owners: frozenset[nn.Module] = frozenset()

    #: The wrapper the layout was read from: ``"fsdp1"`` or ``"fairscale"``.
    wrapper: str = ""
    #: FSDP1 with ``use_orig_params=True``: the stepped tensors are the original
    #: parameters' shard views, not the flat parameters.
    orig_params: bool = False

    # With use_orig_params=True a late block can be fixed on some ranks only, so no rank
    # can tell alone whether a kept table is stale: combined afresh on every call.
    keeps_table = False

    def refuse_fsdp1_optim_state_dict(self, momentum_dtype: str | None, param_groups: Sequence[dict]) -> None:
        """Raise ``ValueError`` when FSDP1's own optimizer state dict would misread SGD-SaI's
        state (called by the guard :func:`guard_fsdp1_optim_state_dict` installs, before
        FSDP1 issues any collective). FSDP1 treats every state tensor that is not a scalar
        as a shard of its parameter, in the parameter's dtype, and all-gathers and
        unflattens it: right for a momentum buffer of the parameter's dtype under
        ``use_orig_params=True``; wrong for the per-segment g-SNR vectors of a flat
        parameter (``use_orig_params=False``: a size mismatch inside the all-gather), for
        int8 codes (their per-block scales are not element-shaped) and for a buffer of
        another dtype (bf16 momentum of float32 parameters: gloo aborted the process).

        Decided from the settings and the layout's blocks, which every rank shares, not
        from this rank's state: a rank whose shard holds only small parameters has no int8
        state, and must refuse with the others rather than enter FSDP1's collectives alone."""
        if self.wrapper != "fsdp1":
            return
        problem = None
        if not self.orig_params:
            example = f"; e.g. the {self.describe(self.flats[0])}" if self.flats else ""
            problem = (
                f"it steps FSDP1's flat parameters (use_orig_params=False{example}), whose g-SNR and "
                "scale are vectors over the parameters each shard holds"
            )
        elif momentum_dtype is not None:
            with_momentum = {id(p) for g in param_groups if g.get("momentum", 0) != 0 for p in g["params"]}
            for b in range(self.num_blocks):
                p = self._params[b]
                if p is None or id(p) not in with_momentum:
                    continue
                stored = lowp.storage_dtype(momentum_dtype, self.block_numels[b], p.dtype)
                if stored != p.dtype:
                    kind = "int8 codes with per-block scales" if stored == torch.int8 else str(stored)
                    name, numel = self.block_name(b), self.block_numels[b]
                    problem = (
                        f"momentum_dtype={momentum_dtype!r} stores the momentum of {name} ({numel} "
                        f"elements, {p.dtype}) as {kind}, not in its parameter's dtype"
                    )
                    break
        if problem is None:
            return
        raise ValueError(
            f"SGDSaI: FSDP1's optimizer state dict (FSDP.optim_state_dict, or DCP's get_optimizer_state_dict "
            f"through it) cannot carry this optimizer's state: {problem}; FSDP1 would gather and unflatten "
            "it as a shard of the parameter. Save optimizer.state_dict() on every rank instead (torch.save; "
            "same-world-size resume is bit-identical), or use use_orig_params=True with momentum_dtype=None, "
            "or FSDP2 (fully_shard), whose state sai_dist.checkpoint saves and reshards."
        )

    def table_rows(self, model: nn.Module) -> list[tuple[str, int, int]]:
        # The original parameter objects may be gone (use_orig_params=False), so rows come
        # from the layout's own names rather than model.named_parameters(), re-rooted at
        # ``model`` (a part of the module the layout was built from, say a LightningModule's
        # ``self.net``, or a wrapper of it).
        rename = self._renamer(model)
        rows = []
        for b in range(self.num_blocks):
            name = rename(self.block_name(b))
            if name is not None:  # None: outside the module asked about
                rows.append((name, b, self.block_numels[b]))
        return rows

    def _renamer(self, model: nn.Module) -> Any:
        """``name -> name relative to model`` (``None`` for blocks outside it)."""
        root = self.root
        if root is None or model is root:
            return lambda name: name
        for prefix, module in root.named_modules():
            if module is model:  # a part of the root: its rows, prefix dropped
                head = unwrapped_path(root, prefix, param_owners=self.param_owners)
                if not head:  # only wrapper segments in between (FSDP's _fsdp_wrapped_module)
                    return lambda name: name
                head += "."
                return lambda name: name[len(head) :] if name.startswith(head) else None
        for prefix, module in model.named_modules():
            if module is root:  # a wrapper of the root: prefix added
                head = unwrapped_path(model, prefix)
                return lambda name: _join(head, name)
        raise ValueError(
            f"gsnr_table: the module passed ({type(model).__name__}) is neither the module this "
            f"flat-parameter layout was built from ({type(root).__name__}) nor a part or a wrapper of it; "
            "pass that module or one of its submodules."
        )


@dataclass
class _Block:
    """One original parameter found in a wrapper's metadata."""

    key: tuple[int, int]  # (owning module's position in model.modules(), position within)
    path: str  # its name in the wrapped model's tree (model.named_modules() + its own name)
    numel: int
    param: Tensor | None  # the original parameter object, where the wrapper keeps it


class _Builder:
    """Collects blocks and flat tensors, then numbers blocks in model order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module_index = {id(m): i for i, m in enumerate(model.modules())}
        self.prefix = {id(m): name for name, m in model.named_modules()}
        self.blocks: list[_Block] = []
        # (flat tensor, [(local block id, start, stop, offset)])
        self.flats: list[tuple[Tensor, list[tuple[int, int, int, int]]]] = []
        self.groups: list[dist.ProcessGroup | None] = []
        self.varying_tensors = False
        self.param_owners: set[nn.Module] = set()
        self.wrapper = ""
        self.orig_params = False

    def add_block(self, module: nn.Module, position: int, path: str, numel: int, param: Tensor | None) -> int:
        """A block owned by ``module``, at ``path`` in the wrapped model's tree."""
        key = (self.module_index.get(id(module), len(self.module_index)), position)
        self.blocks.append(_Block(key, path, numel, param))
        self.param_owners.add(module)
        return len(self.blocks) - 1

    def path_of(self, module: nn.Module, name: str) -> str:
        """The path of ``module``'s own parameter ``name`` in the wrapped model's tree."""
        return _join(self.prefix[id(module)], name)

    def build(self) -> FlatParamLayout:
        groups = {id(g): g for g in self.groups}
        if len(groups) > 1:
            raise LayoutError(
                "SGDSaI: the FSDP units of this model shard over different process groups; the "
                "flat-parameter layout reduces g-SNR statistics over one group."
            )
        group = self.groups[0] if self.groups else None
        order = sorted(range(len(self.blocks)), key=lambda i: self.blocks[i].key)
        index = {old: new for new, old in enumerate(order)}
        blocks = [self.blocks[i] for i in order]
        # Named as the user's unwrapped model spells them, read along the model's tree.
        owners = frozenset(self.param_owners)
        names = [unwrapped_name(self.model, b.path, param_owners=owners) for b in blocks]
        layout = FlatParamLayout(group, [b.param for b in blocks], names, [b.numel for b in blocks])
        for flat, segs in self.flats:
            layout.add_flat(flat, [Segment(index[b], start, stop, off) for b, start, stop, off in segs])
        layout.ranks_hold_different_params = self.varying_tensors
        layout.wrapper = self.wrapper
        layout.orig_params = self.orig_params
        layout.root = self.model
        layout.param_owners = owners
        return layout


def _flat_param_sgdsai(optim: Any) -> Any:
    """The SGD-SaI optimizer on an FSDP1 flat-parameter layout that ``optim`` is or wraps
    (accelerate's ``AcceleratedOptimizer.optimizer``, in-backward's ``.optimizer``), or
    ``None``. Duck-typed: this module imports no optimizer."""
    for _ in range(4):
        if optim is None:
            return None
        if isinstance(getattr(optim, "layout", None), FlatParamLayout) and hasattr(optim, "momentum_dtype"):
            return optim
        optim = getattr(optim, "optimizer", None) or getattr(optim, "_optimizer", None)
    return None


def guard_fsdp1_optim_state_dict() -> None:
    """Wrap FSDP1's ``FullyShardedDataParallel._optim_state_dict_impl`` (idempotent) so
    that it first asks the optimizer's flat-parameter layout whether it can carry the
    state (:meth:`FlatParamLayout.refuse_fsdp1_optim_state_dict`). Why there: every way
    to FSDP1's optimizer state dict passes through it (``optim_state_dict`` with or
    without an ``optim_state_dict`` argument, ``full_`` and ``sharded_optim_state_dict``,
    DCP's ``get_optimizer_state_dict``), after ``optimizer.state_dict()`` (local) and
    before any collective; FSDP1 offers no hook. Other optimizers pass through untouched.
    A torch without that function is left as it is."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    impl = FSDP1.__dict__.get("_optim_state_dict_impl")
    if not isinstance(impl, staticmethod) or getattr(impl.__func__, "_sai_dist_guard", False):
        return
    inner = impl.__func__

    @functools.wraps(inner)
    def guarded(model: nn.Module, optim: Any, *args: Any, **kwargs: Any) -> Any:
        sgdsai = _flat_param_sgdsai(optim)
        if sgdsai is not None:
            sgdsai.layout.refuse_fsdp1_optim_state_dict(sgdsai.momentum_dtype, sgdsai.param_groups)
        return inner(model, optim, *args, **kwargs)

    guarded._sai_dist_guard = True  # type: ignore[attr-defined]
    FSDP1._optim_state_dict_impl = staticmethod(guarded)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_fsdp1_unit(module: nn.Module) -> bool:
    handle = getattr(module, "_handle", None)
    return handle is not None and hasattr(getattr(handle, "flat_param", None), "_shard_param_infos")


def _is_fairscale_unit(module: nn.Module) -> bool:
    return hasattr(module, "_num_flatten_params") and hasattr(module, "numel_padded_per_param")


def from_fsdp1(model: nn.Module) -> FlatParamLayout:
    """Layout of a model wrapped (possibly nested) with FSDP1, for the tensors
    ``model.parameters()`` gives: flat parameters (``use_orig_params=False``) or the
    original parameters' sharded views (``use_orig_params=True``)."""
    b = _Builder(model)
    b.wrapper = "fsdp1"
    units = [m for m in model.modules() if _is_fsdp1_unit(m)]
    if not units:
        raise LayoutError("SGDSaI: no FSDP1 unit with parameters found in the model")
    guard_fsdp1_optim_state_dict()
    for unit in units:
        handle = unit._handle
        flat = handle.flat_param
        sharded = bool(handle.uses_sharded_strategy)
        b.groups.append(
            unit.process_group if sharded and dist.get_world_size(unit.process_group) > 1 else None
        )
        infos = flat._shard_param_infos
        orig = bool(handle._use_orig_params)
        ids: list[int] = []
        for i, ((name, module, _), shape) in enumerate(zip(flat._param_infos, flat._shapes, strict=True)):
            param = flat._params[i] if orig else None
            ids.append(b.add_block(module, i, b.path_of(module, name), math.prod(shape), param))
        b.orig_params = orig  # FSDP1 requires the same setting for every unit
        if orig:
            # A view with no element on this rank never gets a gradient here, so which
            # tensors have one differs by rank (the cross-rank check must not compare it).
            b.varying_tensors = True
            for i, info in enumerate(infos):
                segs = []
                if info.in_shard and info.numel_in_shard > 0:
                    segs.append((ids[i], 0, info.numel_in_shard, info.intra_param_start_idx))
                b.flats.append((flat._params[i], segs))
        else:
            segs = [
                (
                    ids[i],
                    info.offset_in_shard,
                    info.offset_in_shard + info.numel_in_shard,
                    info.intra_param_start_idx,
                )
                for i, info in enumerate(infos)
                if info.in_shard and info.numel_in_shard > 0
            ]
            b.flats.append((flat, segs))
    return b.build()


def fairscale_shard_range(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """``(lo, hi, local)``: rank ``rank`` of ``world`` holds real elements ``[lo, hi)`` of
    a flattened tensor of ``numel`` elements, in a local shard of ``local`` elements (the
    rest is end padding), as fairscale's ``FullyShardedDataParallel._get_shard`` cuts it
    with ``torch.chunk``."""
    local = -(-numel // world)  # ceil: the length of chunk 0, which every shard is padded to
    lo = min(rank * local, numel)
    return lo, min(lo + local, numel), local


def from_fairscale_fsdp(model: nn.Module) -> FlatParamLayout:
    """Layout of a model wrapped (possibly nested) with fairscale's
    ``FullyShardedDataParallel``, ``flatten_parameters`` True or False."""
    b = _Builder(model)
    b.wrapper = "fairscale"
    units = [m for m in model.modules() if _is_fairscale_unit(m)]
    if not units:
        raise LayoutError("SGDSaI: no fairscale FullyShardedDataParallel unit found in the model")
    # Where each still-registered parameter (flatten_parameters=False) lives in the model.
    owner: dict[int, tuple[nn.Module, int, str]] = {}
    for module in model.modules():
        for pos, (name, p) in enumerate(module._parameters.items()):
            if p is not None:
                owner.setdefault(id(p), (module, pos, b.path_of(module, name)))
    for unit in units:
        world, rank = int(unit.world_size), int(unit.rank)
        unit_prefix = b.prefix.get(id(unit), "")
        for i, p in enumerate(unit.params):
            sharded = bool(p._is_sharded)
            b.groups.append(unit.process_group if sharded else None)
            total = int(p._orig_size.numel())
            if i < unit._num_flatten_params:
                ids = [
                    b.add_block(module, k, b.path_of(module, name), int(n), None)
                    for k, ((_, module, name), n) in enumerate(
                        zip(p._param_infos, p._param_numels, strict=True)
                    )
                ]
                numels = [int(n) for n in p._param_numels]
            else:
                fallback = (unit, i, _join(unit_prefix, unit._param_name_groups[i][0]))
                module, pos, path = owner.get(id(p), fallback)
                ids = [b.add_block(module, pos, path, total, p)]
                numels = [total]
            if sum(numels) != total:
                raise LayoutError(
                    f"fairscale FSDP parameter {i}: metadata gives {sum(numels)} elements, not {total}"
                )
            lo, hi, local = fairscale_shard_range(total, rank, world) if sharded else (0, total, total)
            if p.numel() != local:
                raise LayoutError(
                    f"fairscale FSDP parameter {i} holds {p.numel()} elements on rank {rank}, not the "
                    f"{local} its shard should have: is the model unsharded (summon_full_params) right now?"
                )
            offsets = [sum(numels[:k]) for k in range(len(numels))]
            segs = segments_in_range(numels, offsets, ids, lo, hi)
            b.flats.append((p, [(s.block, s.start, s.stop, s.offset) for s in segs]))
    return b.build()


def flat_param_layout(model: nn.Module) -> FlatParamLayout:
    """The layout for ``SGDSaI(model.parameters(), layout=...)`` of a model wrapped with
    FSDP1 or fairscale's ``FullyShardedDataParallel`` (whichever it finds). Build it after
    wrapping, on every rank."""
    modules: Sequence[nn.Module] = list(model.modules())
    if any(_is_fsdp1_unit(m) for m in modules):
        return from_fsdp1(model)
    if any(_is_fairscale_unit(m) for m in modules):
        return from_fairscale_fsdp(model)
    raise LayoutError(
        "SGDSaI: flat_param_layout found neither an FSDP1 nor a fairscale FullyShardedDataParallel unit "
        "in the model"
    )
