"""Process-group set-up for every common launcher, with no code change by the user.

:func:`detect` reads the environment the launcher left and returns a :class:`DistEnv`
(rank, world size, local rank, rendezvous address), or ``None`` for a plain single process:

==================  ==========================================================================
launcher            what it sets (what we read)
==================  ==========================================================================
torchrun            ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
                    ``MASTER_ADDR``/``MASTER_PORT`` (c10d rendezvous result, single or multi-node)
deepspeed           the same variables (its ``launch.py`` exports them; it also passes
                    ``--local_rank``, which the CLI accepts and ignores)
SLURM ``srun``      ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, ``SLURM_LOCALID``;
                    ``MASTER_ADDR`` from the environment or the first host of the node list,
                    ``MASTER_PORT`` from the environment or derived from ``SLURM_JOB_ID``
mpirun/mpiexec      Open MPI ``OMPI_COMM_WORLD_*``, MPICH/Hydra ``PMI_RANK``/``PMI_SIZE``, PMIx
                    ``PMIX_RANK``; without ``MASTER_ADDR``/``MASTER_PORT``, rank 0's host and a
                    free port are broadcast with mpi4py
==================  ==========================================================================

``torchrun``-style variables win when present (the deepspeed launcher and ``torchrun`` inside
an allocation both set them). :func:`init` then joins a process group: NCCL (plus gloo for CPU
collectives) on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def export(self) -> None:
        """Write the torchrun-style variables so ``init_method='env://'`` and libraries that
        read them (DeepSpeed, DCP) agree with us."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``.

    Handles the compressed forms ``scontrol show hostnames`` expands: a prefix followed by a
    bracketed list of numbers and zero-padded ranges.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    m = re.match(r"([^\[,]*)(?:\[([^\]]+)\])?", nodelist)
    assert m is not None  # the pattern matches any string
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _port(environ: Mapping[str, str]) -> int | None:
    return _int(environ, "MASTER_PORT")


def detect(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The distributed set-up the launcher describes, or ``None`` for a plain process."""
    env = os.environ if environ is None else environ
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        local = _int(env, "LOCAL_RANK")
        return DistEnv(
            rank=rank,
            world_size=world,
            local_rank=rank if local is None else local,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env) or 29500,
            launcher="torchelastic" if "TORCHELASTIC_RUN_ID" in env else "env",
        )
    if "SLURM_STEP_ID" in env and _int(env, "SLURM_PROCID") is not None:
        # Inside `srun` (a job step). The batch script itself also has SLURM_PROCID=0, but
        # no step id of its own tasks, so a bare `python` in an sbatch script stays single.
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = _int(env, "SLURM_JOB_ID") or 0
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        m = re.match(r"(\d+)", tasks_per_node)
        return DistEnv(
            rank=_int(env, "SLURM_PROCID") or 0,
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID") or 0,
            local_world_size=int(m.group(1)) if m else world,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodes),
            # A port per job, so two jobs sharing a node do not collide.
            master_port=_port(env) or 20000 + job % 20000,
            launcher="slurm",
        )
    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    mpi_size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if mpi_rank is not None:
        if mpi_size is None:
            mpi_size = _mpi_world().Get_size()
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
        addr, port = env.get("MASTER_ADDR"), _port(env)
        if addr is None or port is None:
            addr, port = _mpi_rendezvous(addr, port)
        return DistEnv(
            rank=mpi_rank,
            world_size=mpi_size,
            local_rank=mpi_rank if local_rank is None else local_rank,
            local_world_size=local_size or mpi_size,
            master_addr=addr,
            master_port=port,
            launcher="mpi",
        )
    return None


def _mpi_world():  # type: ignore[no-untyped-def]
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "launched by mpirun without MASTER_ADDR/MASTER_PORT and without mpi4py: "
            "`pip install mpi4py` (extra `sai_dist[mpi]`) or export MASTER_ADDR and MASTER_PORT"
        ) from exc
    return MPI.COMM_WORLD


def _mpi_rendezvous(addr: str | None, port: int | None) -> tuple[str, int]:
    """Rank 0 picks its address and a free port and broadcasts them over MPI."""
    comm = _mpi_world()
    if comm.Get_rank() == 0:
        if addr is None:
            # One host for the whole job: loopback is always reachable. Otherwise rank 0's
            # resolvable host name.
            hosts = comm.gather(socket.gethostname(), root=0)
            addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.getfqdn()
        else:
            comm.gather(socket.gethostname(), root=0)
        port = port or free_port("0.0.0.0")
        comm.bcast((addr, port), root=0)
    else:
        comm.gather(socket.gethostname(), root=0)
        addr, port = comm.bcast(None, root=0)
    assert addr is not None and port is not None
    return addr, port


def device_for(env: DistEnv | None, want: str = "auto") -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (or asked for), else CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    index = (env.local_rank if env else 0) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init(env: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the default process group described by ``env`` (idempotent)."""
    if dist.is_initialized():
        return
    env.export()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(env, timeout)
    try:
        dist.init_process_group(
            backend,
            init_method=None if store is not None else "env://",
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, ValueError) as exc:
        chosen = {k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ}
        if not chosen:
            raise
        named = ", ".join(f"{k}={v}" for k, v in chosen.items())
        raise RuntimeError(
            f"rank {env.rank}: joining the process group failed with {named}: set it to the interface "
            f"that holds this host's cluster address (`ip -br addr`), or unset it. ({exc})"
        ) from exc


def _attempt_store(env: DistEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun's c10d rendezvous the workers share the agent's TCPStore, which
    outlives a restart; ``env://`` adds no per-attempt prefix, so a restarted attempt can
    read the dead attempt's keys (gloo/NCCL addresses) and fail to connect or hang
    (pytorch/pytorch#135712). The job keys its process group by the restart count instead.
    ``None``: nothing to fix, ``env://`` as usual."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"sai_dist/attempt_{attempt}", client)
