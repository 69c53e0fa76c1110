"""Rank functions for tests/distributed/test_fsdp1.py: real FSDP1 (torch FullyShardedDataParallel)
training on CPU with gloo, against the single-process SGDSaI of tests/distributed/fsdp2_ranks.py.

The model (two blocks wrapped as their own FSDP1 units, the root holding the rest) and
the data split are those of the FSDP2 tests. ``use_orig_params=True`` keeps the three
param groups; ``use_orig_params=False`` hands the optimizer one flat parameter per unit,
which mixes decayed and undecayed parameters, so it runs with one param group and is
compared against a single-process run with that one group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import sai_dist
from tests.distributed import fsdp2_ranks


def make_single_group_optimizer(model: nn.Module, layout: Any = None) -> sai_dist.SGDSaI:
    return sai_dist.SGDSaI(
        model.parameters(), lr=fsdp2_ranks.LR, momentum=0.9, weight_decay=0.05, layout=layout
    )


def reference_single_group() -> dict[Any, Any]:
    model = fsdp2_ranks.make_model()
    opt = make_single_group_optimizer(model)
    for step in range(fsdp2_ranks.STEPS):
        fsdp2_ranks.loss_fn(model, *fsdp2_ranks.batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {fsdp2_ranks.STEPS: fsdp2_ranks.full_params(model), "table": sai_dist.gsnr_table(model, opt)}


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``fsdp2_ranks.param_groups`` for a model whose parameters FSDP1 made 1-D shard
    views (``use_orig_params=True``): classified by the unwrapped parameter's shape."""
    from sai_dist.names import unwrapped_name

    ndim = {n: p.ndim for n, p in fsdp2_ranks.make_model().named_parameters()}
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "vector": [], "embed": []}
    for name, p in model.named_parameters():
        name = unwrapped_name(model, name)
        kind = "embed" if name.startswith(("embed", "pos")) else "vector" if ndim[name] == 1 else "matrix"
        groups[kind].append(p)
    reference = fsdp2_ranks.param_groups(fsdp2_ranks.make_model())
    return [{**ref, "params": groups[kind]} for ref, kind in zip(reference, groups, strict=True)]


def _wrap(world: int, orig: bool, strategy: str) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.fsdp import ShardingStrategy

    kwargs: dict[str, Any] = {
        "use_orig_params": orig,
        "device_id": torch.device("cpu"),
        "sharding_strategy": getattr(ShardingStrategy, strategy),
    }
    if strategy == "HYBRID_SHARD":
        from torch.distributed.device_mesh import init_device_mesh

        names = ("replicate", "shard")
        kwargs["device_mesh"] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=names)
    model = fsdp2_ranks.make_model()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP1(block, **kwargs)
    return FSDP1(model, **kwargs)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every original parameter, whole (collective: FSDP1 all-gathers)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    with FSDP1.summon_full_params(model, writeback=False):
        return fsdp2_ranks.full_params(model)


def fsdp1_run(rank: int, world: int, orig: bool, strategy: str) -> dict[str, Any]:
    from sai_dist.layouts import flat_param_layout
    from tests.support.collectives import CollectiveCounter

    model = _wrap(world, orig, strategy)
    layout = flat_param_layout(model)
    if orig:
        opt = sai_dist.SGDSaI(param_groups(model), lr=fsdp2_ranks.LR, momentum=0.9, layout=layout)
    else:
        opt = make_single_group_optimizer(model, layout)
    counts = []
    for step in range(fsdp2_ranks.STEPS):
        fsdp2_ranks.loss_fn(model, *fsdp2_ranks.rank_slice(step, rank, world)).backward()
        with CollectiveCounter() as c:
            opt.step()
        counts.append(dict(c.counts))
        opt.zero_grad()
    local = sum(p.numel() for p in model.parameters())
    held = sum(s.stop - s.start for f in layout.flats for s in layout.segments(f))
    return {
        "layout": type(opt.layout).__name__,
        "group_size": None if layout.group is None else torch.distributed.get_world_size(layout.group),
        "counts": counts,
        "local_elements": local,
        "held_elements": held,
        "table": sai_dist.gsnr_table(model, opt),  # collective: every rank calls it
        "params": full_params(model),
    }


def refusal(rank: int, world: int) -> str:
    """SGDSaI on a real FSDP1 model without the flat-parameter layout."""
    from sai_dist.layouts import LayoutError

    model = _wrap(world, False, "FULL_SHARD")
    try:
        sai_dist.SGDSaI(model.parameters())
    except LayoutError as e:
        return str(e)
    return "no error"


class _OwnsModule(nn.Module):
    """A user's submodule called ``module`` beside a parameter ``weight`` of its parent:
    dropping the segment would make ``net.module.weight`` and ``net.weight`` one key. With
    no other child, the parent looks like a pure wrapper once FSDP1 (``use_orig_params=False``)
    has flattened its ``weight`` away: only the layout's knowledge of owners keeps the name."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) @ self.weight


class _ModuleNamedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _OwnsModule()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def module_named_tables(rank: int, world: int) -> dict[str, Any]:
    """``gsnr_table`` after one step of :class:`_ModuleNamedModel` (the same batch on every
    rank, so the averaged gradient is the single-process one) single-process, under DDP,
    FSDP2, and FSDP1 with the flat-parameter layout (``use_orig_params`` False and True,
    ``net.module`` its own unit)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sai_dist.layouts import flat_param_layout

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

    def one_step(wrapped: nn.Module, params: Any, layout: Any = None) -> dict[str, Any]:
        opt = sai_dist.SGDSaI(params, lr=0.1, layout=layout)
        wrapped(x).square().mean().backward()
        opt.step()
        return sai_dist.gsnr_table(wrapped, opt)

    out = {"single": one_step(model := _ModuleNamedModel(), model.parameters())}
    ddp = DDP(_ModuleNamedModel())
    out["ddp"] = one_step(ddp, ddp.parameters())
    model = _ModuleNamedModel()
    fully_shard(model.net.module)
    fully_shard(model)
    out["fsdp2"] = one_step(model, model.parameters())
    for orig in (False, True):
        model = _ModuleNamedModel()
        model.net.module = FSDP1(model.net.module, use_orig_params=orig, device_id=torch.device("cpu"))
        model = FSDP1(model, use_orig_params=orig, device_id=torch.device("cpu"))
        key = f"fsdp1_{'orig' if orig else 'flat'}"
        out[key] = one_step(model, model.parameters(), flat_param_layout(model))
    return out


def _state_tensors(opt: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    """Every state tensor of ``opt``, keyed by (tensor index, state key)."""
    return {(i, k): v for i, st in enumerate(opt.state.values()) for k, v in st.items() if torch.is_tensor(v)}


def own_optim_state_dict(rank: int, world: int) -> dict[str, Any]:
    """FSDP1's own optimizer state dict: with ``use_orig_params=True`` and float32 momentum
    a round trip (``FSDP.optim_state_dict`` -> ``optim_state_dict_to_load`` -> a fresh
    optimizer) and two more steps, against the run that went on; the combinations it would
    misread (flat parameters, int8 and bf16 momentum), each refused through
    ``FSDP.optim_state_dict`` and DCP's ``get_optimizer_state_dict``, while
    ``optimizer.state_dict()`` called directly still works and nothing changes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    from sai_dist.layouts import flat_param_layout

    def build(orig: bool, momentum_dtype: str | None) -> tuple[nn.Module, sai_dist.SGDSaI]:
        model = _wrap(world, orig, "FULL_SHARD")
        groups = param_groups(model) if orig else model.parameters()
        layout = flat_param_layout(model)
        opt = sai_dist.SGDSaI(
            groups, lr=fsdp2_ranks.LR, momentum=0.9, layout=layout, momentum_dtype=momentum_dtype
        )
        return model, opt

    def train(model: nn.Module, opt: sai_dist.SGDSaI, steps: range) -> None:
        for step in steps:
            fsdp2_ranks.loss_fn(model, *fsdp2_ranks.rank_slice(step, rank, world)).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build(True, None)
    train(model, opt, range(2))
    osd = FSDP1.optim_state_dict(model, opt)
    saved_model = model.state_dict()
    shapes = {name: tuple(st["momentum_buffer"].shape) for name, st in osd["state"].items()}
    train(model, opt, range(2, 4))
    resumed, resumed_opt = build(True, None)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(FSDP1.optim_state_dict_to_load(resumed, resumed_opt, osd))
    train(resumed, resumed_opt, range(2, 4))
    out: dict[str, Any] = {"shapes": shapes, "continued": full_params(model), "resumed": full_params(resumed)}

    # Models with weights of 4096 elements or more, so int8 momentum really holds codes (the
    # transformer's tensors are all under the small-tensor rule). SMALL_ON_ONE_RANK: an
    # 8192-element weight first, then only small tensors, so one rank's shard holds no int8
    # state at all and must still refuse with the other.
    from tests.distributed import lowp_flat_ranks as lf

    small_on_one_rank = ((128, 64, True), (64, 63, True), (63, 64, True))
    refused = {}
    for name, orig, momentum_dtype, spec in (
        ("flat_float32", False, None, lf.ALIGNED_FLAT),
        ("orig_int8", True, "int8", small_on_one_rank),
        ("orig_bfloat16", True, "bfloat16", lf.ALIGNED_FLAT),
    ):
        model = FSDP1(lf.make_model(spec), use_orig_params=orig, device_id=torch.device("cpu"))
        opt = sai_dist.SGDSaI(
            model.parameters(), layout=flat_param_layout(model), momentum_dtype=momentum_dtype, **lf.PARAMS
        )
        x, y = lf.batch(0, spec[0][0])
        lf.loss_fn(model(x), y).backward()
        opt.step()

        before = {key: v.clone() for key, v in _state_tensors(opt).items()}
        errors = []
        for call in (
            lambda m, o: FSDP1.optim_state_dict(m, o),
            lambda m, o: FSDP1.optim_state_dict(
                m, o, optim_state_dict=o.state_dict()
            ),  # torch's documented form
            lambda m, o: get_optimizer_state_dict(m, o),
        ):
            try:
                call(model, opt)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        direct = opt.state_dict()  # the documented path keeps working
        after = _state_tensors(opt)
        refused[name] = {
            "errors": errors,
            "direct_states": len(direct["state"]),
            "holds_int8": any("momentum_scale" in st for st in opt.state.values()),
            "unchanged": before.keys() == after.keys()
            and all(torch.equal(before[k], after[k]) for k in before),
        }
    out["refused"] = refused
    return out


def launch_2(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {
            "module_named": module_named_tables(rank, world),
            "flat": fsdp1_run(rank, world, False, "FULL_SHARD"),
            "orig": fsdp1_run(rank, world, True, "FULL_SHARD"),
            "grad_op": fsdp1_run(rank, world, True, "SHARD_GRAD_OP"),
            "no_shard": fsdp1_run(rank, world, False, "NO_SHARD"),
            "refusal": refusal(rank, world),
            "own_state_dict": own_optim_state_dict(rank, world),
        }
    )


def launch_3(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {
            "flat": fsdp1_run(rank, world, False, "FULL_SHARD"),
            "orig": fsdp1_run(rank, world, True, "FULL_SHARD"),
        }
    )


def launch_4(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {
            "hybrid_orig": fsdp1_run(rank, world, True, "HYBRID_SHARD"),
            "hybrid_flat": fsdp1_run(rank, world, False, "HYBRID_SHARD"),
        }
    )
