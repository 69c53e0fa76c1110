"""Single-process checks of the DeepSpeed integration's pieces: the flat-segment layout
against a hand-built partition, bad input, config loading, checkpoint format."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from sai_dist import SGDSaI, gsnr_table
from sai_dist.layouts import LayoutError
from sai_dist.layouts.zero import FlatSegmentLayout, Segment, from_fp16_unfused
from sai_dist.stats import Piece, reduce_block_moments


def _two_blocks() -> tuple[list[torch.Tensor], FlatSegmentLayout]:
    a, b = torch.randn(3, 4), torch.randn(5)
    return [a, b], FlatSegmentLayout(None, [a, b], ["a", "b"], [12, 5])


def test_segments_give_exact_block_moments():
    """One flat holding a[4:12] then b[0:3] then 1 padding element, another holding b[3:5]
    then 2 padding elements: the moments equal those of the whole blocks, padding excluded."""
    _, layout = _two_blocks()
    ga, gb = torch.randn(12, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ga_first = ga[:4]
    f1, f2 = torch.zeros(12), torch.zeros(4)
    layout.add_flat(f1, [Segment(0, 0, 8, 4), Segment(1, 8, 11, 0)])
    layout.add_flat(f2, [Segment(1, 0, 2, 3)])
    g1 = torch.cat([ga[4:], gb[:3], torch.tensor([1e6], dtype=torch.float64)]).float()
    g2 = torch.cat([gb[3:], torch.tensor([7.0, 7.0], dtype=torch.float64)]).float()
    # The part of `a` the flats do not hold (another rank's) comes as a whole-tensor source.
    extra = (ga_first.float(), [Piece(0)])
    m = reduce_block_moments([(g1, layout.pieces(f1)), (g2, layout.pieces(f2)), extra], 2, None)
    for block, g in ((0, ga.float().double()), (1, gb.float().double())):
        assert int(m.count[block]) == g.numel()
        torch.testing.assert_close(m.sumsq[block], g.square().sum())
        torch.testing.assert_close(m.std[block], g.std())


def test_bad_segments_and_unknown_tensors_raise():
    _, layout = _two_blocks()
    with pytest.raises(LayoutError, match="outside"):
        layout.add_flat(torch.zeros(4), [Segment(0, 2, 6, 0)])
    with pytest.raises(LayoutError, match="runs past"):
        layout.add_flat(torch.zeros(8), [Segment(1, 0, 8, 0)])
    with pytest.raises(LayoutError, match="unknown block"):
        layout.add_flat(torch.zeros(8), [Segment(5, 0, 2, 0)])
    with pytest.raises(LayoutError, match="does not know"):
        layout.pieces(torch.zeros(3))


def test_unfused_layout_steps_like_plain_sgdsai():
    """Stage-0 fp16/bf16 wrapper: fp32 master copies stepped through the layout give the
    same update as SGDSaI on the model's own tensors."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    masters = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    wrapper = SimpleNamespace(fp16_groups=[list(model.parameters())], fp32_groups=[masters])
    opt = SGDSaI(masters, lr=0.1)
    opt.use_layout(from_fp16_unfused(wrapper, {id(p): n for n, p in model.named_parameters()}))
    ref_opt = SGDSaI(ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
        for m, r in zip(masters, ref.parameters(), strict=True):
            m.grad = r.grad.clone()
        opt.step()
    for m, r in zip(masters, ref.parameters(), strict=True):
        torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)
    table = gsnr_table(model, opt)
    assert set(table) == {"weight", "bias"}
    assert table["weight"]["gsnr"] == pytest.approx(float(ref_opt.state[ref.weight]["gsnr"]))


def test_gsnr_table_walks_every_piece_of_a_flat_partition():
    """One flat tensor holding two blocks and padding: gsnr_table's one walk over the pieces
    gives each block the g-SNR and scale SGDSaI gives the separate tensors, in the model's
    order, the ZeRO-3-style element counts from the layout; before step 1 it is empty, and
    emptied param groups (ZeRO-3 between steps) do not empty it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ref_model = torch.nn.Linear(3, 2)
    ref_model.load_state_dict(model.state_dict())
    g_w, g_b = torch.randn(2, 3), torch.randn(2) * 2 + 1
    layout = FlatSegmentLayout(None, [model.weight, model.bias], ["weight", "bias"], [6, 2])
    flat = torch.nn.Parameter(
        torch.cat([model.weight.detach().reshape(-1), model.bias.detach(), torch.zeros(2)])
    )
    layout.add_flat(flat, [Segment(0, 0, 6, 0), Segment(1, 6, 8, 0)])
    opt = SGDSaI([flat], lr=0.1, layout=layout)
    assert gsnr_table(model, opt) == {}
    flat.grad = torch.cat([g_w.reshape(-1), g_b, torch.full((2,), 1e9)])  # padding never counts
    opt.step()
    ref = SGDSaI(ref_model.parameters(), lr=0.1)
    ref_model.weight.grad, ref_model.bias.grad = g_w.clone(), g_b.clone()
    ref.step()
    table = gsnr_table(model, opt)
    assert list(table) == ["weight", "bias"]
    for name, p in ref_model.named_parameters():
        assert table[name]["numel"] == p.numel()
        assert table[name]["gsnr"] == float(ref.state[p]["gsnr"])
        assert table[name]["scale"] == float(ref.state[p]["scale"])
    # ZeRO-3 leaves each param group's params [] between its steps: the walk reads the
    # state, so the table stays the same.
    opt.param_groups[0]["params"] = []
    layout.table_cache = None  # walk again rather than read the table kept above
    assert gsnr_table(model, opt) == table


def test_use_layout_refused_after_gsnr_is_fixed():
    p = torch.nn.Parameter(torch.randn(4))
    opt = SGDSaI([p])
    p.grad = torch.randn(4)
    opt.step()
    with pytest.raises(RuntimeError, match="already fixed"):
        opt.use_layout(FlatSegmentLayout(None, [p], ["p"], [4]))


needs_ds = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


@needs_ds
def test_config_loading(tmp_path):
    from sai_dist.deepspeed.config import load_config

    cfg = {"optimizer": {"type": "SGDSaI", "params": {"lr": 0.1}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    assert load_config(str(path), None)[0] == cfg
    loaded, _ = load_config(cfg, None)
    assert loaded == cfg and loaded is not cfg  # a copy: the caller's dict is not edited
    args = SimpleNamespace(deepspeed_config=str(path), local_rank=0)
    loaded, new_args = load_config(None, args)
    assert loaded == cfg and new_args.deepspeed_config is None and args.deepspeed_config == str(path)
    with pytest.raises(TypeError, match="dict or a path"):
        load_config(42, None)


@needs_ds
def test_registration_and_checkpoint_format(tmp_path):
    import deepspeed.runtime.zero.utils as zero_utils

    import sai_dist.deepspeed as sds

    assert torch.optim.SGDSaI is SGDSaI
    assert SGDSaI in zero_utils.ZERO_SUPPORTED_OPTIMIZERS
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not a sai_dist DeepSpeed optimizer checkpoint"):
        sds.load_optimizer_state(None, bad)


class _OwnsModule(torch.nn.Module):
    """A user's submodule called ``module`` beside a parameter that would collide with
    ``module.weight`` were the segment dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(4, 3)
        self.weight = torch.nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) @ self.weight


class _Engine(torch.nn.Module):
    """Stands in for a DeepSpeed engine: the user's model as ``module``, the optimizer beside."""

    def __init__(self, module: torch.nn.Module, optimizer: SGDSaI) -> None:
        super().__init__()
        self.module = module
        self.optimizer = optimizer


def test_table_and_checkpoint_keep_a_users_submodule_called_module(tmp_path):
    """One name policy (sai_dist.names): the flat-segment layout DeepSpeed attaches, named
    from the engine's ``module``, gives the g-SNR table (asked of the engine or of the
    model) and the world-size-free checkpoint the single-process keys and values, a
    user's ``module`` segment kept."""
    import sai_dist.deepspeed as sds
    from sai_dist.deepspeed.engine import param_names

    torch.manual_seed(0)
    model, ref = _OwnsModule(), _OwnsModule()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    ref_opt = SGDSaI(ref.parameters(), lr=0.1)
    ref(x).square().mean().backward()
    ref_opt.step()
    want = gsnr_table(ref, ref_opt)
    assert list(want) == ["weight", "module.weight", "module.bias"]

    masters = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = SGDSaI(masters, lr=0.1)
    engine = _Engine(model, opt)
    wrapper = SimpleNamespace(fp16_groups=[list(model.parameters())], fp32_groups=[masters])
    opt.use_layout(from_fp16_unfused(wrapper, param_names(engine.module)))
    for m, r in zip(masters, ref.parameters(), strict=True):
        m.grad = r.grad.clone()
    opt.step()
    for asked in (engine, model):
        assert gsnr_table(asked, opt) == want
    path = tmp_path / "opt.pt"
    sds.save_optimizer_state(engine, path)
    saved = torch.load(path, weights_only=False)["params"]
    assert list(saved) == list(want)
    for name, row in want.items():
        assert (saved[name]["gsnr"], saved[name]["scale"]) == (row["gsnr"], row["scale"])
