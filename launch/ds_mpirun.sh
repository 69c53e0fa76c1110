#!/usr/bin/env bash
# SGD-SaI under DeepSpeed, started by mpirun/mpiexec (mpich or Open MPI, with mpi4py).
#
#   one host, 2 CPU ranks:  NP=2 EXTRA="--cpu" launch/ds_mpirun.sh configs/ds_zero2.json
#   multi-host (mpich):     NP=16 MPI_ARGS="-hosts node1,node2 -ppn 8" \
#                           MASTER_ADDR=node1 launch/ds_mpirun.sh configs/ds_zero3.json
#
# ds_train.py discovers rank / world size / local rank with mpi4py and exports them; the
# rendezvous host is MASTER_ADDR (default 127.0.0.1, so set it for multi-host jobs) on
# MASTER_PORT (default 29500). Install: pip install 'sai_dist[deepspeed,mpi]'.
set -euo pipefail
CONFIG=${1:-configs/ds_zero2.json}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${ROOT}${PYTHONPATH:+:$PYTHONPATH}
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
# shellcheck disable=SC2086
exec mpiexec -n "${NP:-2}" ${MPI_ARGS:-} python "$ROOT/launch/ds_train.py" --config "$CONFIG" ${EXTRA:-} "$@"
