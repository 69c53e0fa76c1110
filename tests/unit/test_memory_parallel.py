"""``sai-dist memory --tp/--pp`` (sai_dist.memory.parallel): stage split, TP shapes, the
low-precision rules on local pieces, refusals and the CLI, against closed forms written
out here (the measured check is tests/distributed/test_memory_parallel3d.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sai_dist import momentum as lowp
from sai_dist.cli import main as cli_main
from sai_dist.memory import rank_memory, resolve_model
from sai_dist.memory.models import ModelSpec, param_shapes
from sai_dist.memory.parallel import (
    check_degrees,
    local_params,
    parallel_memory,
    stage_blocks,
    stage_params,
)
from sai_dist.memory.plan import largest_unit


def _spec(module: nn.Module, name: str = "test") -> ModelSpec:
    return ModelSpec(name, module, None, param_shapes(module))


class _Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)


class _Toy(nn.Module):
    def __init__(self, d: int = 40, hidden: int = 64, layers: int = 3, vocab: int = 127) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _toy(**kw) -> ModelSpec:
    with torch.device("meta"):
        return _spec(_Toy(**kw))


@pytest.mark.parametrize(
    "n, pp, sizes",
    [(32, 4, [8, 8, 8, 8]), (10, 4, [3, 3, 2, 2]), (3, 2, [2, 1]), (5, 5, [1] * 5), (7, 1, [7])],
)
def test_stage_blocks_contiguous_even_earlier_stages_take_the_extra(n, pp, sizes):
    ranges = stage_blocks(n, pp)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(n))


def test_stage_blocks_refuses_more_stages_than_blocks():
    with pytest.raises(ValueError, match=r"--pp 5: cannot split 4 blocks"):
        stage_blocks(4, 5)


def test_stage_params_embeddings_first_norm_and_head_last_tied_head_on_both():
    gpt = resolve_model("gpt2")  # tied: lm_head.weight is wte.weight
    first, last = stage_params(gpt.module, 2)
    names0, names1 = [n for n, _ in first], [n for n, _ in last]
    assert names0[:2] == ["wte.weight", "wpe.weight"] and names1[-2:] == ["ln_f.weight", "lm_head.weight"]
    assert {n.split(".")[1] for n in names0[2:]} == {str(i) for i in range(6)}
    assert {n.split(".")[1] for n in names1[:-2]} == {str(i) for i in range(6, 12)}
    # pp = 2 holds the tied (50304, 768) tensor once per stage; pp = 1 once in all.
    total = sum(math.prod(s) for _, s in first + last)
    assert total == gpt.numel + 50304 * 768
    assert stage_params(gpt.module, 1) == [gpt.params]


def test_tp_plan_shapes_for_llama_and_fused_gpt2_qkv():
    llama = {p.name: p for p in local_params(resolve_model("llama2-7b").params, tp=2, dp=1)}
    assert llama["layers.0.wq.weight"].tp_shape == (2048, 4096)  # colwise: dim 0
    assert llama["layers.0.w1.weight"].tp_shape == (5504, 4096)
    assert llama["layers.0.wo.weight"].tp_shape == (4096, 2048)  # rowwise: dim 1
    assert llama["layers.0.w2.weight"].tp_shape == (4096, 5504)
    for name in ("tok_embeddings.weight", "layers.0.attention_norm.weight", "norm.weight", "output.weight"):
        assert llama[name].tp_shape == llama[name].shape and llama[name].style == "replicate"
    gpt = {p.name: p for p in local_params(resolve_model("gpt2").params, tp=4, dp=2)}
    assert gpt["h.0.c_attn.weight"].tp_shape == (3 * 768 // 4, 768)  # fused qkv over its rows
    assert gpt["h.0.c_attn.weight"].shard_dims == (0, 0)  # TP, then FSDP2's dim-0 (strided) shard
    assert gpt["h.0.mlp_proj.weight"].shard_dims == (1, 0)
    toy = {p.name: p for p in local_params(_toy().params, tp=2, dp=1)}
    assert toy["layers.0.qkv.bias"].tp_shape == (60,)  # a column-parallel bias is split
    assert toy["layers.0.down.bias"].tp_shape == (40,) and toy["layers.0.down.bias"].style == "replicate"


def test_llama2_7b_stage_elements_closed_form():
    d, inter, vocab = 4096, 11008, 32000
    block_local = (4 * d * d + 3 * d * inter) // 2 + 2 * d  # TP halves the 7 linears, norms whole
    pm = parallel_memory(resolve_model("llama2-7b"), 8, tp=2, pp=4)  # dp = 1: nothing FSDP-sharded
    assert [s.blocks for s in pm.stages] == [list(range(8 * i, 8 * i + 8)) for i in range(4)]
    assert [s.local_elements for s in pm.stages] == [
        vocab * d + 8 * block_local,
        8 * block_local,
        8 * block_local,
        8 * block_local + d + vocab * d,
    ]
    last = pm.stages[3]
    assert last.memory.state["sgd_sai"] == 4 * last.local_elements == last.memory.params
    assert pm.busiest.stage == 3  # the final norm tips it over the embedding stage
    # FSDP2 over dp 8: every TP-local tensor split by rows, chunks ceil(rows / 8).
    pm8 = parallel_memory(resolve_model("llama2-7b"), 64, tp=2, pp=4)
    rows = {(2048, 4096): 256, (4096, 2048): 512, (5504, 4096): 688, (4096, 5504): 512, (4096,): 512}
    block8 = sum(rows[s] * math.prod(s[1:]) for s in [(2048, 4096)] * 3 + [(4096, 2048)])
    block8 += sum(rows[s] * math.prod(s[1:]) for s in [(5504, 4096)] * 2 + [(4096, 5504)]) + 2 * 512
    assert pm8.stages[1].local_elements == 8 * block8
    assert pm8.stages[1].memory.transient == 2 * 4 * block_local  # 2 gathered TP-local blocks


def test_int8_scales_per_local_piece_small_rule_on_original_size():
    spec = _toy()
    pm = parallel_memory(spec, 2, tp=2, pp=1, momentum_dtype="int8")  # TP only, dp 1
    # qkv.weight: 4800 elements (int8), local 2400 -> 2 scales (the whole tensor would have 3);
    # up.weight 2560 and o.weight 1600: float32 (under 4096 originally); embed/head 5080 whole, 3 scales.
    per_block = (2400 + 4 * 2) + 4 * 60 + 4 * 800 + 4 * 1280 + 4 * 32 + 4 * 1280 + 4 * 40
    ends = 2 * (5080 + 4 * 3) + 4 * 40 * 2
    assert pm.stages[0].memory.state["sgd_sai"] == 3 * per_block + ends
    assert lowp.num_scales([2400]) == 2 and lowp.num_scales([4800]) == 3
    # A colwise tensor of 4096 elements stays int8 though its TP piece has 2048 (< 4096).
    with torch.device("meta"):
        wide = _spec(_Toy(d=32, hidden=128, layers=1, vocab=16))  # up.weight (128, 32) = 4096
    with pytest.raises(ValueError, match=r"layers\.0\.down\.weight \(32, 128\) is row-parallel"):
        parallel_memory(wide, 2, tp=2, momentum_dtype="int8")  # the default plan's row-parallel partner
    only_up = parallel_memory(wide, 2, tp=2, momentum_dtype="int8", plan={"up": "colwise"})
    whole = parallel_memory(wide, 1, momentum_dtype="int8")
    up_tp, up_whole = 64 * 32 + 4 * 1 + 4 * 64, 4096 + 4 * 2 + 4 * 128  # weight int8 + bias float32
    assert (
        whole.stages[0].memory.state["sgd_sai"] - only_up.stages[0].memory.state["sgd_sai"]
        == up_whole - up_tp
    )
    # FSDP2 shards each piece: uneven 64 / 63 embedding rows over dp 2, blocks restart per shard.
    pm = parallel_memory(spec, 4, tp=1, pp=2, momentum_dtype="int8", dp_rank=1)
    embed = 63 * 40 + 4 * lowp.num_scales([63 * 40])
    first = pm.stages[0]
    assert first.memory.state["sgd_sai"] == embed + 2 * (
        (60 * 40 + 4 * 2) + 4 * 60 + 4 * (20 * 40) + 4 * (32 * 40) + 4 * 32 + 4 * (20 * 64) + 4 * 20
    )


def test_dp1_tp1_pp1_is_the_single_and_fsdp2_rules():
    spec = resolve_model("gpt2")
    shapes = [s for _, s in spec.params]
    for world, strategy in ((1, "single"), (4, "fsdp2")):
        pm = parallel_memory(spec, world, 1, 1, "bf16-mixed", momentum_dtype="bfloat16", dp_rank=world - 1)
        mem = pm.stages[0].memory
        want = rank_memory(
            shapes,
            strategy,
            world,
            "bf16-mixed",
            momentum_dtype="bfloat16",
            rank=world - 1,
            largest_unit=largest_unit(spec.module),
        )
        assert mem.as_dict() == want.as_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=6, tp=4, pp=1), r"--world-size 6 is not divisible by --tp 4 x --pp 1"),
        (dict(world_size=4, tp=0, pp=1), r"--tp must be an integer >= 1"),
        (dict(world_size=2, tp=1, pp=2, momentum_dtype="int8"), None),
        (
            dict(world_size=2, tp=2, pp=1, momentum_dtype="bfloat16"),
            r"layers\.0\.o\.weight \(40, 40\) is row-",
        ),
        (dict(world_size=4, tp=2, pp=1, momentum_dtype="int8"), None),  # colwise qkv + FSDP2: contiguous
        (
            dict(world_size=4, tp=2, pp=1, momentum_dtype="bfloat16"),
            r"layers\.0\.o\.weight \(40, 40\) is row-parallel \(Shard\(1\)\)",
        ),
        (dict(world_size=2, tp=2, pp=1, momentum_dtype="int8"), None),
        (dict(world_size=16, tp=16, pp=1), r"layers\.0\.qkv\.weight \(120, 40\) is column-parallel .* by 16"),
        (dict(world_size=3, tp=3, pp=1), r"layers\.0\.o\.weight \(40, 40\) is row-parallel .* 40 columns"),
        (dict(world_size=4, tp=1, pp=4), r"--pp 4: cannot split 3 blocks"),
    ],
)
def test_refusals_name_the_flag_or_tensor(kwargs, match):
    spec = _toy()
    if match is None:
        parallel_memory(spec, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            parallel_memory(spec, **kwargs)


def test_heads_must_divide_tp_and_check_degrees():
    with pytest.raises(ValueError, match=r"gpt2-xl has 25 attention heads \(n_head\), not divisible by 2"):
        parallel_memory(resolve_model("gpt2-xl"), 2, tp=2)
    with pytest.raises(ValueError, match=r"has 8 attention heads \(n_kv_head\), not divisible by 16"):
        parallel_memory(resolve_model("llama2-70b"), 16, tp=16)
    assert check_degrees(64, 2, 4) == 8


def test_cli_json_and_table(capsys):
    argv = ["memory", "--model", "llama2-7b", "--tp", "2", "--pp", "4", "--world-size", "64"]
    assert cli_main([*argv, "--json", "--device-mem", "80GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    par = out["parallel"]
    assert (par["tp"], par["pp"], par["dp"], par["data_parallel"]) == (2, 4, 8, "fsdp2")
    assert [s["blocks"] for s in par["stages"]] == [list(range(8 * i, 8 * i + 8)) for i in range(4)]
    busiest = par["stages"][par["busiest_stage"]]["memory"]
    assert out["strategies"] == {"fsdp2": busiest}
    verdicts = {v["optimizer"]: v for v in out["planner"]["verdicts"]}
    held = [
        m["params"] + m["grads"] + m["transient"] + m["state"]["sgd_sai"]
        for m in (s["memory"] for s in par["stages"])
    ]
    assert verdicts["sgd_sai"]["total"] == max(held) + out["planner"]["activation_bytes"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "tp 2 x pp 4 x dp 8 (FSDP2 over dp 8)" in text and "* busiest stage" in text
    assert cli_main([*argv, "--strategies", "zero2,fsdp2"]) == 2
    assert "--strategies zero2 with --tp/--pp" in capsys.readouterr().err
    assert cli_main([*argv, "--momentum-dtype", "int8"]) == 2
    assert "SGDSaI refuses low-precision momentum" in capsys.readouterr().err
    assert cli_main([*argv, "--in-backward"]) == 2
    assert "--in-backward models one process, not --tp/--pp" in capsys.readouterr().err
    pp_only = ["memory", "--model", "llama2-7b", "--pp", "4", "--world-size", "8", "--momentum-dtype", "int8"]
    assert cli_main(pp_only) == 0
