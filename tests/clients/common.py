"""Shared pieces of the client tests: a tiny ``LlamaForCausalLM``, its batches, and the
single-process SGD-SaI reference every client run is compared with.

The model is built from a ``LlamaConfig`` (no download): 2 layers, hidden 32, grouped
query attention (4 heads, 2 KV heads), untied 64-token embeddings, fp32, eager attention.
Batches are fixed random token ids, ``labels = input_ids``; every rank of an N-rank run
takes a contiguous 1/N slice of the global batch, so with equal token counts the mean of
the per-rank mean losses is the global mean loss the reference minimises.
"""

from __future__ import annotations

import json
from typing import Any

import torch

import sai_dist

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 64, 8, 4, 4
HYPER: dict[str, float] = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01}


def make_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """The global batch of step ``step``: ``[GLOBAL_BATCH, SEQ]`` token ids."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    share = GLOBAL_BATCH // world
    return batch(step)[rank * share : (rank + 1) * share]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def reference(
    steps: int = STEPS, hyper: dict[str, float] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float | int]]]:
    """Parameters and g-SNR table after ``steps`` single-process SGDSaI steps on the full
    batches (no process group: the plain, replicated layout)."""
    model = make_model()
    opt = sai_dist.SGDSaI(model.parameters(), **(hyper or HYPER), check_ranks=False)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step()
    return params_of(model), sai_dist.gsnr_table(model, opt)


def params_of(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (gathered) fp32 parameters by their unwrapped name, with ``prefix`` stripped."""
    from torch.distributed.tensor import DTensor

    from sai_dist.names import unwrapped_name

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        name = unwrapped_name(model, name)
        out[name[len(prefix) :] if name.startswith(prefix) else name] = t.detach().float().cpu().clone()
    return out


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter relative L2 error; the names must match exactly."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)) for k in want)


def table_rel_err(got: dict[str, Any], want: dict[str, Any]) -> float:
    assert list(got) == list(want), (list(got)[:3], list(want)[:3])
    return max(abs(got[k]["gsnr"] - want[k]["gsnr"]) / abs(want[k]["gsnr"]) for k in want)


def write(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def compare(
    result: dict[str, Any],
    params: dict[str, torch.Tensor],
    table: dict[str, Any],
    hyper: dict[str, float] | None = None,
) -> None:
    """Add the errors against the single-process reference to ``result``."""
    want_params, want_table = reference(hyper=hyper)
    result["param_rel_err"] = max_rel_err(params, want_params)
    result["table_rel_err"] = table_rel_err(table, want_table)
    result["table_names"] = list(table)[:3]
