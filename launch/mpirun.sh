#!/usr/bin/env bash
# mpirun / mpiexec (MPICH's Hydra from `pip install mpich`, or Open MPI): NP ranks.
# sai_dist reads PMI_RANK/PMI_SIZE (MPICH) or OMPI_COMM_WORLD_* (Open MPI); rank 0's host
# and a free port are broadcast with mpi4py, so no MASTER_ADDR is needed.
#   NP=2 launch/mpirun.sh --backend fsdp2
#   NP=16 HOSTS=node0:8,node1:8 launch/mpirun.sh --backend hsdp     # multi-node (MPICH syntax)
# Where host names do not resolve to the cluster interface, export MASTER_ADDR=<rank 0's
# cluster address> (and GLOO_SOCKET_IFNAME); MPIEXEC_ARGS="..." adds launcher flags, e.g.
# "-launcher ssh -launcher-exec /path/to/remote-shell -iface eth0".
set -euo pipefail
hosts=()
if [[ -n "${HOSTS:-}" ]]; then hosts=(-hosts "$HOSTS"); fi
# shellcheck disable=SC2206
extra=(${MPIEXEC_ARGS:-})
exec "${MPIEXEC:-mpiexec}" "${extra[@]}" -n "${NP:-2}" "${hosts[@]}" "${PYTHON:-python}" -m sai_dist.train "$@"
