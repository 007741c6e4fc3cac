#!/usr/bin/env bash
# Per-node launch for clusters without passwordless ssh: run this once on EVERY node, each with its own rank.
# Usage: launch/deepspeed_node.sh HOSTFILE NODE_RANK MASTER_ADDR CONFIG [key=value ...]
#   node 0: launch/deepspeed_node.sh launch/hostfile 0 node001 configs/mae_vit_l16.yaml
#   node 1: launch/deepspeed_node.sh launch/hostfile 1 node001 configs/mae_vit_l16.yaml
# Env: MASTER_PORT (default 29500), NUM_GPUS (default: the node's slots in the hostfile), DRY_RUN=1.
set -euo pipefail
usage() { echo "usage: $0 HOSTFILE NODE_RANK MASTER_ADDR CONFIG [key=value ...]" >&2; exit 2; }
[ $# -ge 4 ] || usage
hostfile=$1; node_rank=$2; master=$3; config=$4; shift 4
[ -f "$hostfile" ] || { echo "$0: hostfile not found: $hostfile" >&2; exit 2; }
[ -f "$config" ] || { echo "$0: config not found: $config" >&2; exit 2; }
[[ "$node_rank" =~ ^[0-9]+$ ]] || { echo "$0: NODE_RANK must be a number, got '$node_rank'" >&2; exit 2; }
nodes=$(grep -cvE '^\s*(#|$)' "$hostfile")
[ "$node_rank" -lt "$nodes" ] || { echo "$0: NODE_RANK $node_rank but $hostfile lists $nodes nodes" >&2; exit 2; }
port=${MASTER_PORT:-29500}
cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master"
     --master_port "$port" --module vitscale train --config "$config" "$@")
echo "+ ${cmd[*]}"
[ -n "${DRY_RUN:-}" ] || exec "${cmd[@]}"
