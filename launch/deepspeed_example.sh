#!/usr/bin/env bash
# The DeepSpeed example script (ds_train.py: a config file's "type": "SGDSaI" through
# sai_dist.deepspeed.initialize), started by the `deepspeed` launcher. The training job
# (`sai-dist train`) under the same launcher is launch/deepspeed.sh.
#
#   multi-host:  HOSTFILE=launch/hostfile.example launch/deepspeed_example.sh configs/ds_zero3.json
#   one host:    NUM_GPUS=8 launch/deepspeed_example.sh configs/ds_zero2.json
#   CPU only:    NUM_GPUS=2 EXTRA="--cpu" launch/deepspeed_example.sh configs/ds_zero2.json
#
# The launcher sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT on every host and passes
# --local_rank; ds_train.py reads "type": "SGDSaI" from the config through
# sai_dist.deepspeed.initialize. MASTER_ADDR defaults to the first host of the hostfile.
set -euo pipefail
CONFIG=${1:-configs/ds_zero2.json}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${ROOT}${PYTHONPATH:+:$PYTHONPATH}
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
  [[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
else
  ARGS+=(--num_gpus "${NUM_GPUS:-1}")
fi
# shellcheck disable=SC2086
exec deepspeed "${ARGS[@]}" "$ROOT/launch/ds_train.py" --config "$CONFIG" ${EXTRA:-} "$@"
