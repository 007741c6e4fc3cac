#!/usr/bin/env bash
# The second GPU call of a window: the loader rows again (after a fix) and a profile of each engine step that
# missed its target (benchmarks/profile_step.py: phases and top kernels/operators). OUT=dir keeps the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu_profile}; mkdir -p "$OUT"
QUICK_ONLY=${QUICK_ONLY:-loader_device,loader_worker} QUICK_BUDGET=${QUICK_BUDGET:-200} \
  python3 benchmarks/quick.py --out "$OUT"
VIT=(--config configs/sup_vit_l16.yaml model.grad_checkpointing=false model.drop_path=0.0 data.batch_size=128)
MAE=(--config configs/mae_vit_l16.yaml model.grad_checkpointing=false data.batch_size=256)
timeout 120 python3 benchmarks/profile_step.py "${VIT[@]}" --json "$OUT/prof_zero2.json" > "$OUT/prof_zero2.txt" 2>&1
timeout 120 python3 benchmarks/profile_step.py "${VIT[@]}" engine.zero_stage=3 --json "$OUT/prof_zero3.json" > "$OUT/prof_zero3.txt" 2>&1
timeout 120 python3 benchmarks/profile_step.py "${MAE[@]}" --json "$OUT/prof_mae.json" > "$OUT/prof_mae.txt" 2>&1
grep -h "whole step" "$OUT"/prof_*.txt
