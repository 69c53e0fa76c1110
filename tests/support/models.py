"""Small models with awkward shapes for the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 3 * dim)
        self.down = nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A decoder with 1-D params, a 1-element gate and a dim-0-of-3 projection."""

    def __init__(
        self, vocab: int = 37, dim: int = 24, heads: int = 4, layers: int = 2, seq: int = 12
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(layers))
        self.squeeze = nn.Linear(dim, 3)  # dim 0 smaller than most world sizes
        self.expand = nn.Linear(3, dim, bias=False)
        self.gate = nn.Parameter(torch.tensor([0.5]))  # a 1-element block
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = x + self.gate * self.expand(torch.tanh(self.squeeze(x)))
        return self.head(self.ln_f(x))


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def batches(steps: int, batch: int = 8, seq: int = 13, vocab: int = 37, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(steps)]


def param_groups(model: nn.Module, lr: float = 0.05) -> list[dict]:
    """Three groups: matrices with decay, vectors without, the head with its own lr."""
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("head"):
            head.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0, "momentum": 0.8},
        {"params": head, "lr": lr * 0.5, "weight_decay": 0.05},
    ]
