"""A small GPT-style decoder over byte tokens (vocabulary 256).

Pre-norm transformer blocks: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``, causal
self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`, learned
absolute positions, an untied output head. Each block is its own module so FSDP2 can shard
it as a unit (``fully_shard`` per block, then on the root).

Attention projections: ``qkv="fused"`` (the default) is one ``qkv`` Linear whose output rows
are ``[q; k; v]``; ``qkv="separate"`` is three Linears ``q``, ``k``, ``v`` (same shapes as the
fused one's thirds, same N(0, 0.02) initialisation), the form tensor parallel needs: a
column-wise split of the fused weight would cut across q, k and v instead of across heads.

Pipeline stages (:mod:`sai_dist.train.parallel3d`) keep this class and its parameter names:
a stage's model has the other stages' blocks replaced by ``nn.Identity`` and, off the first
stage, ``tok_emb``/``pos_emb`` set to ``None`` (its input is then the hidden state), off the
last stage ``ln_f``/``head`` set to ``None`` (its output is the hidden state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB_SIZE = 256  # byte-level tokens: no tokenizer, no downloads
QKV_FORMS = ("fused", "separate")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the decoder; ``d_model`` must be divisible by ``n_heads``."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    dropout: float = 0.0
    vocab_size: int = VOCAB_SIZE
    qkv: str = "fused"

    def __post_init__(self) -> None:
        if self.qkv not in QKV_FORMS:
            raise ValueError(f"GPTConfig.qkv must be one of {QKV_FORMS}, got {self.qkv!r}")
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.separate = cfg.qkv == "separate"
        if self.separate:
            self.q = nn.Linear(cfg.d_model, cfg.d_model)
            self.k = nn.Linear(cfg.d_model, cfg.d_model)
            self.v = nn.Linear(cfg.d_model, cfg.d_model)
        else:
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if self.separate:
            # Under tensor parallel q/k/v return this rank's heads only (n_heads / tp of
            # them): the head count is inferred, the head width is fixed.
            q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        else:
            q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``GPT(cfg)(tokens) -> logits`` of shape ``(batch, seq, vocab)``; tokens are int64
    in ``[0, vocab_size)`` with ``seq <= cfg.seq_len``. A pipeline stage's model (see the
    module doc) maps hidden states ``(batch, seq, d_model)`` in and/or out instead."""

    tok_emb: nn.Embedding | None
    pos_emb: nn.Embedding | None
    ln_f: nn.LayerNorm | None
    head: nn.Linear | None

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
                p.normal_(0.0, std)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"GPT: sequence of {t} tokens exceeds seq_len={self.cfg.seq_len}")
        if self.tok_emb is None or self.pos_emb is None:
            x = tokens  # a later pipeline stage: the previous stage's hidden state
        else:
            pos = torch.arange(t, device=tokens.device)
            x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        if self.head is None or self.ln_f is None:
            return x  # not the last pipeline stage
        return self.head(self.ln_f(x))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats per byte), computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
