#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the main job: `sai-dist train` with its defaults,
# a few minutes of distributed SGD-SaI training on this machine. Arguments go to the job.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh" >/dev/null
# shellcheck disable=SC1091
source "${SAI_DIST_VENV:-$root/.venv}/bin/activate"
cd "$root"
export TORCH_EXTENSIONS_DIR="$root/.torch_extensions"
exec sai-dist train "$@"
