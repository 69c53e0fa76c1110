"""Model presets built as real ``nn.Module`` architectures on the meta device.

Counting parameters from the architecture itself (not from a formula) is what makes the
accounting exact: every tensor the optimizer will see, with its real shape, and tied
weights counted once, exactly as ``model.parameters()`` yields them. Building on the meta
device allocates no memory, so a 70B model costs nothing to count.

Three families cover the presets:

* :class:`NanoGPT`: nanoGPT's ``GPT`` (learned positions, pre-LayerNorm blocks, GELU MLP of
  width 4h, ``lm_head`` tied to ``wte``, optional biases), the GPT-2 family's shapes;
* :class:`LlamaDecoder`: Llama 2 (RMSNorm weights only, rotary positions with no
  parameters, SwiGLU MLP, grouped-query attention, untied ``lm_head``);
* :class:`ViT`: the ViT of Dosovitskiy et al. / timm (conv patch embedding, class token,
  learned positions, pre-LayerNorm blocks with biases, linear head).

The modules implement ``forward`` too, so the same code trains in the tight-memory
benchmark and in the measured tests.

Not the job's model: ``sai_dist.train.model.GPT`` is the training job's small byte-level
decoder (untied head, biases, optional separate q/k/v for tensor parallel), built to train
here; these are the published architectures the accounting counts. Two models, two names.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "LlamaDecoder",
    "ModelSpec",
    "NanoGPT",
    "NanoGPTConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "param_shapes",
    "resolve_model",
]


# -- NanoGPT (the GPT-2 family) -----------------------------------------------------------------


@dataclass(frozen=True)
class NanoGPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    block_size: int = 1024
    bias: bool = False


class _GPTBlock(nn.Module):
    def __init__(self, c: NanoGPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.attn_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.mlp_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (z.view(b, t, self.n_head, h // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: ``lm_head.weight`` is ``wte.weight`` (tied, counted once)."""

    def __init__(self, config: NanoGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(_GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


# -- Llama 2 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    dim: int = 4096
    intermediate: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 4096
    tie_embeddings: bool = False


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotary(x: Tensor) -> Tensor:
    """Rotary position embedding (no parameters), x: [b, heads, t, d]."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class _LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv = c.n_head, c.n_kv_head
        hd = c.dim // c.n_head
        self.attention_norm = _RMSNorm(c.dim)
        self.wq = nn.Linear(c.dim, c.n_head * hd, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(c.n_head * hd, c.dim, bias=False)
        self.ffn_norm = _RMSNorm(c.dim)
        self.w1 = nn.Linear(c.dim, c.intermediate, bias=False)
        self.w2 = nn.Linear(c.intermediate, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.intermediate, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(b, t, self.n_head, -1).transpose(1, 2)
        k = self.wk(h).view(b, t, self.n_kv, -1).transpose(1, 2)
        v = self.wv(h).view(b, t, self.n_kv, -1).transpose(1, 2)
        q, k = _rotary(q), _rotary(k)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LlamaDecoder(nn.Module):
    """Llama 2 decoder; ``output`` is untied from ``tok_embeddings`` unless configured."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if config.dim % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(
                f"LlamaConfig: dim {config.dim}, heads {config.n_head}/{config.n_kv_head} do not divide"
            )
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(_LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = _RMSNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


# -- ViT -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    num_classes: int = 1000
    channels: int = 3


class _ViTBlock(nn.Module):
    def __init__(self, c: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width)
        self.attn = nn.MultiheadAttention(c.width, c.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(c.width)
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Vision Transformer with a class token and a linear classification head."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(
                f"ViTConfig: image {config.image_size} not divisible by patch {config.patch_size}"
            )
        self.config = config
        n = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.channels, config.width, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, config.width))
        self.blocks = nn.ModuleList(_ViTBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.num_classes)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, 0]))
        return logits if targets is None else F.cross_entropy(logits, targets)


# -- presets and resolution ------------------------------------------------------------

ModelConfig = NanoGPTConfig | LlamaConfig | ViTConfig

PRESETS: dict[str, ModelConfig] = {
    # nanoGPT's model_type table, with its training defaults bias=False, vocab 50304.
    "gpt2": NanoGPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": NanoGPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": NanoGPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": NanoGPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Llama 2 (Touvron et al. 2023, params.json of the released checkpoints).
    "llama2-7b": LlamaConfig(n_layer=32, n_head=32, n_kv_head=32, dim=4096, intermediate=11008),
    "llama2-13b": LlamaConfig(n_layer=40, n_head=40, n_kv_head=40, dim=5120, intermediate=13824),
    "llama2-70b": LlamaConfig(n_layer=80, n_head=64, n_kv_head=8, dim=8192, intermediate=28672),
    # ViT-S/16 and ViT-H/14 at 224 px with a 1000-class head (timm vit_*_224).
    "vit-s16": ViTConfig(patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536),
    "vit-h14": ViTConfig(patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120),
}
PRESETS["gpt2-small"] = PRESETS["gpt2"]


def build_model(config: ModelConfig) -> nn.Module:
    """The module for a config (on the current default device)."""
    if isinstance(config, NanoGPTConfig):
        return NanoGPT(config)
    if isinstance(config, LlamaConfig):
        return LlamaDecoder(config)
    if isinstance(config, ViTConfig):
        return ViT(config)
    raise TypeError(f"unknown model config {config!r}")


def config_from_hf(path: str | Path) -> ModelConfig:
    """A config from a Hugging Face-style ``config.json`` (``model_type`` gpt2, llama or vit)."""
    try:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from exc
    kind = raw.get("model_type")
    try:
        if kind == "gpt2":
            return NanoGPTConfig(
                n_layer=raw["n_layer"],
                n_head=raw["n_head"],
                n_embd=raw["n_embd"],
                vocab_size=raw["vocab_size"],
                block_size=raw.get("n_positions", raw.get("n_ctx", 1024)),
                bias=raw.get("bias", True),  # HF GPT-2 has biases
            )
        if kind in ("llama", "mistral"):
            return LlamaConfig(
                n_layer=raw["num_hidden_layers"],
                n_head=raw["num_attention_heads"],
                n_kv_head=raw.get("num_key_value_heads", raw["num_attention_heads"]),
                dim=raw["hidden_size"],
                intermediate=raw["intermediate_size"],
                vocab_size=raw["vocab_size"],
                max_seq_len=raw.get("max_position_embeddings", 4096),
                tie_embeddings=raw.get("tie_word_embeddings", False),
            )
        if kind == "vit":
            return ViTConfig(
                image_size=raw.get("image_size", 224),
                patch_size=raw.get("patch_size", 16),
                width=raw["hidden_size"],
                depth=raw["num_hidden_layers"],
                heads=raw["num_attention_heads"],
                mlp_dim=raw["intermediate_size"],
                num_classes=raw.get("num_labels", len(raw.get("id2label", {})) or 1000),
                channels=raw.get("num_channels", 3),
            )
    except KeyError as exc:
        raise ValueError(f"model config {path} (model_type {kind!r}) lacks key {exc}") from exc
    raise ValueError(
        f"model config {path}: unsupported model_type {kind!r} (supported: gpt2, llama, mistral, vit)"
    )


@dataclass
class ModelSpec:
    """A model resolved for accounting: its name, the module (on meta), its config if any,
    and ``(name, shape)`` of every distinct parameter in ``model.parameters()`` order."""

    name: str
    module: nn.Module
    config: ModelConfig | None
    params: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.params)


def param_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of each distinct trainable parameter (tied ones once), in order."""
    return [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad]


def _factory(target: str) -> Callable[[], nn.Module]:
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"--model {target!r}: a factory is written 'package.module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--model {target!r}: cannot import {mod_name!r}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--model {target!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def resolve_model(spec: str) -> ModelSpec:
    """A preset name, a path to a ``config.json``, or ``module:function`` (a factory called
    with no arguments under the meta device) to a :class:`ModelSpec`."""
    config: ModelConfig | None = None
    if spec in PRESETS:
        config = PRESETS[spec]
        make: Callable[[], nn.Module] = lambda: build_model(config)
    elif spec.endswith(".json") or Path(spec).is_file():
        config = config_from_hf(spec)
        make = lambda: build_model(config)
    elif ":" in spec:
        make = _factory(spec)
    else:
        raise ValueError(
            f"unknown model {spec!r}: use a preset ({', '.join(sorted(PRESETS))}), a config.json path, "
            "or a factory 'package.module:function'"
        )
    with torch.device("meta"):
        module = make()
    if not isinstance(module, nn.Module):
        raise ValueError(f"--model {spec!r} returned {type(module).__name__}, not an nn.Module")
    return ModelSpec(name=spec, module=module, config=config, params=param_shapes(module))
