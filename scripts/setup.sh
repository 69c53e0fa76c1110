#!/usr/bin/env bash
# Create .venv (or reuse it) with everything sai_dist, its tests and its main job need.
#
# torch goes in first and pinned: any later package that names torch would otherwise pull
# the newest CUDA build (several GB). Override the pin with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
# deepspeed and fairscale build from source distributions that import torch, so they are
# installed without build isolation, against the torch already here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# tests/job/test_multihost.py makes its hosts with `ip netns` (iproute2); install it when root.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi
venv=${SAI_DIST_VENV:-$root/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# pip's own exit status is kept; only its complaint about index folders that this
# machine's pip configuration names but that do not exist is dropped from the log.
pip_install() {
  python -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# shellcheck disable=SC2086
pip_install $torch_spec
pip_install setuptools wheel numpy
pip_install --no-build-isolation deepspeed==0.19.8 fairscale==0.4.13
pip_install --no-build-isolation -e "$root[dev,job,mpi,clients]"
# torchtitan pins a huggingface_hub that transformers 5.x refuses: its own venv, which
# tests/clients/test_torchtitan.py runs its rank script with (this repo on PYTHONPATH).
titan=${SAI_DIST_TITAN_VENV:-$root/.venv-titan}
if [ ! -x "$titan/bin/python" ]; then
  python3 -m venv "$titan"
fi
# shellcheck disable=SC2086
VIRTUAL_ENV=$titan "$titan/bin/python" -m pip install -q --disable-pip-version-check $torch_spec torchtitan==0.3.0 numpy \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
python - <<'PY'
import torch, deepspeed, fairscale, mpi4py, sai_dist
import transformers, accelerate, lightning
print(f"sai_dist {sai_dist.__version__}: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"fairscale {fairscale.__version__}, mpi4py {mpi4py.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, lightning {lightning.__version__}")
PY
"$titan/bin/python" -c "import torch, torchtitan; print(f'.venv-titan: torch {torch.__version__}, torchtitan ok')"
