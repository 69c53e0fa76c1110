#!/usr/bin/env bash
# mpirun / mpiexec (MPICH's Hydra from `pip install mpich`, or Open MPI): NP ranks.
# sai_dist reads PMI_RANK/PMI_SIZE (MPICH) or OMPI_COMM_WORLD_* (Open MPI); rank 0's host
# and a free port are broadcast with mpi4py, so no MASTER_ADDR is needed.
#   NP=2 launch/mpirun.sh --backend fsdp2
#   NP=16 HOSTS=node0:8,node1:8 launch/mpirun.sh --backend hsdp     # multi-node (MPICH syntax)
set -euo pipefail
hosts=()
if [[ -n "${HOSTS:-}" ]]; then hosts=(-hosts "$HOSTS"); fi
exec "${MPIEXEC:-mpiexec}" -n "${NP:-2}" "${hosts[@]}" "${PYTHON:-python}" -m sai_dist.train "$@"
