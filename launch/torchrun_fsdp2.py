"""SGD-SaI under FSDP2 or HSDP with torchrun: train, print the g-SNR table, save/resume.

    torchrun --nproc-per-node 2 launch/torchrun_fsdp2.py --steps 20 --ckpt-dir /tmp/sai_ckpt
    torchrun --nproc-per-node 4 launch/torchrun_fsdp2.py --replicate 2 --resume --ckpt-dir /tmp/sai_ckpt

(On a machine without a resolvable hostname add ``--master-addr 127.0.0.1 --master-port
29511``.) ``--replicate R`` builds an HSDP mesh of R replicas x world/R shards; the default
R = 1 is plain FSDP2. The checkpoint is a DCP directory that loads at any world size and
either mesh shape: momentum shards are resharded, and g-SNR is restored, never recomputed.

The user-facing recipe is the three marked lines: ``fully_shard`` as usual, ``SGDSaI``
where AdamW was, and ``sai_dist.checkpoint`` for DCP save/load.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import sai_dist
from sai_dist import checkpoint

VOCAB, SEQ, DIM, HEADS, CLASSES = 32, 8, 32, 4, 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Classifier(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def batch(step: int, rank: int, world: int, per_rank: int) -> tuple[Tensor, Tensor]:
    """This rank's slice of a deterministic global batch. The label is the most frequent
    residue of the tokens mod CLASSES (ties to the smallest), which the model can learn."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (per_rank * world, SEQ), generator=g)
    labels = F.one_hot(tokens % CLASSES, CLASSES).sum(1).argmax(1)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return tokens[sl], labels[sl]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replicate", type=int, default=1, help="HSDP replicas (1 = plain FSDP2)")
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 sharded params")
    parser.add_argument("--ckpt-dir", default=None, help="DCP directory written at the end")
    parser.add_argument("--resume", action="store_true", help="load --ckpt-dir before training")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    if world % args.replicate:
        raise SystemExit(f"--replicate {args.replicate} does not divide the world size {world}")
    shape = (args.replicate, world // args.replicate)
    mesh = init_device_mesh("cuda" if cuda else "cpu", shape, mesh_dim_names=("replicate", "shard"))
    if args.replicate == 1:
        mesh = mesh["shard"]

    torch.manual_seed(0)
    model = Classifier().to("cuda" if cuda else "cpu")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)  # <- as usual
    fully_shard(model, mesh=mesh, mp_policy=mp)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = sai_dist.SGDSaI(  # <- where AdamW was
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )

    start = 0
    if args.resume:
        checkpoint.load(args.ckpt_dir, model, optimizer)  # <- DCP, any world size / mesh shape
        start = int(torch.load(os.path.join(args.ckpt_dir, "step.pt"))) if rank == 0 else 0
        step_t = torch.tensor([start])
        dist.broadcast(step_t, 0)
        start = int(step_t)
        if rank == 0:
            print(f"resumed at step {start} on mesh {tuple(mesh.shape)}, initialized={optimizer.initialized}")
    device = "cuda" if cuda else "cpu"
    losses: list[float] = []
    for step in range(start, start + args.steps):
        tokens, labels = batch(step, rank, world, args.batch_per_rank)
        loss = F.cross_entropy(model(tokens.to(device)).float(), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == start and rank == 0:
            print(sai_dist.format_table(sai_dist.gsnr_table(model, optimizer)))
        losses.append(loss.item())
        if rank == 0 and (step + 1 - start) % 5 == 0:
            print(f"step {step + 1}: mean loss of the last 5 steps {sum(losses[-5:]) / 5:.4f}")
    if args.ckpt_dir:
        checkpoint.save(args.ckpt_dir, model, optimizer)
        if rank == 0:
            torch.save(torch.tensor(start + args.steps), os.path.join(args.ckpt_dir, "step.pt"))
            print(f"saved step {start + args.steps} to {args.ckpt_dir}")
    # Nobody tears down the process group while a peer still uses it (rank 0 writes
    # step.pt after the collective save): a rank that exits first closes its gloo
    # connections under the other, which then aborts at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
