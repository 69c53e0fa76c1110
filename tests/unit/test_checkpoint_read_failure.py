"""sai_dist.checkpoint.load reads into copies: a checkpoint that fails half-way through the
read leaves the live model and optimizer bit for bit as they were (the job's run
checkpoints go through the same load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import sai_dist
from sai_dist import checkpoint


def _trained(seed: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))
    opt = sai_dist.SGDSaI(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(16, 64)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out[f"state.{i}.{k}"] = v.clone()
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate_largest_data_file(folder: Path) -> Path:
    data = max(folder.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return data


@pytest.mark.parametrize("optimizer", ["sgdsai", "adamw"])
def test_a_read_failing_half_way_changes_nothing(tmp_path, optimizer):
    saved_model, saved_opt = _trained(seed=0, steps=3)
    if optimizer == "adamw":
        saved_opt = torch.optim.AdamW(saved_model.parameters(), lr=1e-3)
        saved_model(torch.randn(4, 64)).sum().backward()
        saved_opt.step()
    good, bad = tmp_path / "good", tmp_path / "bad"
    checkpoint.save(str(good), saved_model, saved_opt)
    checkpoint.save(str(bad), saved_model, saved_opt)
    _truncate_largest_data_file(bad)

    model, opt = _trained(seed=1, steps=2)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    before = _snapshot(model, opt)
    with pytest.raises(checkpoint.CheckpointReadError, match="nothing was loaded") as err:
        checkpoint.load(str(bad), model, opt)
    assert str(bad) in str(err.value)
    assert _same(_snapshot(model, opt), before)

    # The intact copy of the same checkpoint loads, and then equals what was saved: the
    # comparison above could have failed.
    checkpoint.load(str(good), model, opt)
    assert _same(_snapshot(model, opt), _snapshot(saved_model, saved_opt))
    assert not _same(_snapshot(model, opt), before)
