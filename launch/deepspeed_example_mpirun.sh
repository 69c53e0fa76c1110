#!/usr/bin/env bash
# The DeepSpeed example script (ds_train.py) started by mpirun/mpiexec (mpich or Open MPI, with
# mpi4py). The training job under mpirun is launch/mpirun.sh.
#
#   one host, 2 CPU ranks:  NP=2 EXTRA="--cpu" launch/deepspeed_example_mpirun.sh configs/ds_zero2.json
#   multi-host (mpich):     NP=16 MPI_ARGS="-hosts node1,node2 -ppn 8" \
#                           launch/deepspeed_example_mpirun.sh configs/ds_zero3.json
#
# ds_train.py reads rank / world size / local rank from the MPI environment; rank 0 picks
# its address (127.0.0.1 when every rank shares one host) and a free port and broadcasts
# them with mpi4py. Export MASTER_ADDR/MASTER_PORT to choose them yourself.
# Install: pip install 'sai_dist[deepspeed,mpi]'.
set -euo pipefail
CONFIG=${1:-configs/ds_zero2.json}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${ROOT}${PYTHONPATH:+:$PYTHONPATH}
# shellcheck disable=SC2086
exec mpiexec -n "${NP:-2}" ${MPI_ARGS:-} python "$ROOT/launch/ds_train.py" --config "$CONFIG" ${EXTRA:-} "$@"
