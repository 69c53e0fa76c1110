#!/usr/bin/env bash
# Set up everything from scratch (see scripts/setup.sh) and run lint plus the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k stats`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
# shellcheck disable=SC1091
source "${SAI_DIST_VENV:-$root/.venv}/bin/activate"
cd "$root"
# DeepSpeed JIT-builds a small CPU op once; keep it inside the build tree.
export TORCH_EXTENSIONS_DIR="$root/.torch_extensions"
export MASTER_ADDR=127.0.0.1
export OMP_NUM_THREADS=1
ruff check .
ruff format --check .
# The slowest tests are listed at the end, to keep the suite inside its time budget.
python -m pytest -q -ra --durations=20 "$@"
