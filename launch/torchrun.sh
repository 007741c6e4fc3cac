#!/usr/bin/env bash
# torchrun launch (our engine still owns DeepSpeed; torchrun only starts the processes).
# Usage: launch/torchrun.sh NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR CONFIG [key=value ...]
#   one node, 8 GPUs: launch/torchrun.sh 1 8 0 127.0.0.1 configs/sup_vit_l16.yaml
set -euo pipefail
[ $# -ge 5 ] || { echo "usage: $0 NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR CONFIG [key=value ...]" >&2; exit 2; }
nnodes=$1; nproc=$2; node_rank=$3; master=$4; config=$5; shift 5
[ -f "$config" ] || { echo "$0: config not found: $config" >&2; exit 2; }
port=${MASTER_PORT:-29500}
cmd=(torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --node_rank "$node_rank" --master_addr "$master"
     --master_port "$port" -m vitscale train --config "$config" "$@")
echo "+ ${cmd[*]}"
[ -n "${DRY_RUN:-}" ] || exec "${cmd[@]}"
