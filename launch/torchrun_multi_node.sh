#!/usr/bin/env bash
# Several machines, c10d rendezvous. Run the SAME command on every node:
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=myjob launch/torchrun_multi_node.sh --backend hsdp
# RDZV_ENDPOINT is host:port of any one node (it hosts the rendezvous store); no node rank
# is needed, the rendezvous assigns them. Elastic range: NNODES=1:2 with MAX_RESTARTS=N
# (and --resume auto --name RUN), so the job re-forms on the nodes left after one dies.
#
# Where host names do not resolve to the cluster interface (several networks, containers),
# say it per node instead of letting torchrun guess from the host name:
#   NODE_ADDR=10.0.0.5     this node's address on the cluster network: the address peers
#                          dial (torchrun --local-addr); also picks GLOO_SOCKET_IFNAME, when
#                          unset, as the interface holding that address
#   RDZV_IS_HOST=1|0       whether this node serves the rendezvous store (1 on the node
#                          RDZV_ENDPOINT names, 0 elsewhere); unset: torchrun compares host names
#   RDZV_CONF=k=v,...      more rendezvous settings: join_timeout (s, default 600),
#                          read_timeout (store connect/read, default 60), last_call_timeout
#                          (wait for late nodes once the minimum joined, default 30)
#   TORCHRUN_ARGS="..."    extra torchrun flags, e.g. "--monitor-interval 1"
# and bound how long a rank waits on an unreachable peer with the job's --pg-timeout S.
set -euo pipefail
: "${NNODES:?set NNODES (e.g. 2)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
extra=()
conf=${RDZV_CONF:-}
if [[ -n "${RDZV_IS_HOST:-}" ]]; then conf="is_host=${RDZV_IS_HOST}${conf:+,$conf}"; fi
if [[ -n "$conf" ]]; then extra+=(--rdzv-conf="$conf"); fi
if [[ -n "${NODE_ADDR:-}" ]]; then
    extra+=(--local-addr="$NODE_ADDR")
    if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] && command -v ip >/dev/null; then
        iface=$(ip -o -4 addr show | awk -v a="$NODE_ADDR" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
        if [[ -z "$iface" ]]; then
            echo "torchrun_multi_node.sh: NODE_ADDR=$NODE_ADDR is not an address of this host (ip -o -4 addr)" >&2
            exit 2
        fi
        export GLOO_SOCKET_IFNAME=$iface
    fi
fi
# shellcheck disable=SC2206
extra+=(${TORCHRUN_ARGS:-})
exec "${TORCHRUN:-torchrun}" --nnodes="$NNODES" --nproc-per-node="${NPROC:-2}" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-sai-dist}" \
    --max-restarts="${MAX_RESTARTS:-0}" "${extra[@]}" \
    -m sai_dist.train "$@"
