"""The small model, data and run comparison shared by the optimizer-in-backward tests
(test_in_backward.py, test_in_backward_two_pass.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: one hook, one accumulated gradient
        self.late = nn.Linear(16, 16)  # used only from step 3: a block without a step-1 gradient

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.relu(self.fc1(self.emb(x)))))
        if step >= 3:
            h = h + self.late(h)
        return self.head(h)


def data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 50, (4, 8), generator=g), torch.randint(0, 50, (4, 8), generator=g)


def assert_same_run(ref, ref_opt, ref_losses, got, got_opt, got_losses) -> None:
    """Parameters, losses and every state entry of two runs within 1e-6 (absolute)."""
    for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert got_losses == pytest.approx(ref_losses, abs=1e-6)
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6)
