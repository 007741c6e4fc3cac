#!/usr/bin/env bash
# Multi-node launch with the standard deepspeed launcher (pdsh/ssh from this node to every host).
# Usage: launch/deepspeed.sh HOSTFILE CONFIG [key=value ...]
#   e.g. launch/deepspeed.sh launch/hostfile configs/mae_vit_h14.yaml data.train_shards=/data/in1k/manifest.json
# Env: MASTER_PORT (default 29500), DRY_RUN=1 prints the command without running it.
set -euo pipefail
usage() { echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
hostfile=$1; config=$2; shift 2
[ -f "$hostfile" ] || { echo "$0: hostfile not found: $hostfile" >&2; exit 2; }
[ -f "$config" ] || { echo "$0: config not found: $config" >&2; exit 2; }
port=${MASTER_PORT:-29500}
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] || { echo "$0: bad MASTER_PORT: $port" >&2; exit 2; }
cmd=(deepspeed --hostfile "$hostfile" --master_port "$port" --module vitscale train --config "$config" "$@")
echo "+ ${cmd[*]}"
[ -n "${DRY_RUN:-}" ] || exec "${cmd[@]}"
