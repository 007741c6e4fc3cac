#!/usr/bin/env bash
# Issue 18: the first thing to run in a GPU window. One command, <= 6 minutes on one H200 including the wheel
# install, one table: ViT-L/16 bf16 batch 128 synthetic (timm eager, ours eager and compiled, our engine ZeRO-2 and
# ZeRO-3 eager and compiled), the MAE ViT-L/16 engine step at batch 256, and the real loader step on demo:photos
# with data.decode_on=worker and device; each with img/s, MFU and peak GB.
#
#   bash benchmarks/gpu_quick.sh                  # from the repository root; OUT=dir also writes gpu_quick.json
#   QUICK_CPU=1 bash benchmarks/gpu_quick.sh      # the CPU rehearsal: same commands, tiny model (tests run it)
#   QUICK_ONLY=vit_eager,vit_zero3 bash ...       # some runs only (names: python3 benchmarks/quick.py --help)
#   QUICK_BUDGET=300                              # seconds for all measurements together (default 300)
#   QUICK_DATA=/tmp/vitscale_quick_data           # where demo:photos shards are built on first use
#
# On a GPU box without registry access, build the wheels first on a machine with one (from the project root):
#   bash ../shared/device/prepare-wheels.sh simplejpeg  # -> .whl/ (deepspeed, webdataset, wandb, omegaconf, ..., simplejpeg)
# and bring .whl/ along; this script installs them into /tmp/site when deepspeed is not importable.
# Each measurement is its own `python3 -m vitscale bench ...` with its own timeout: a failure is a row with its
# error, never a lost table. Commands, versions and every row: $OUT/gpu_quick.json; full output: gpu_quick.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
T0=$(date +%s)
if [[ -z "${QUICK_CPU:-}" || "${QUICK_CPU}" == 0 ]]; then
  if ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
    if [[ ! -d .whl ]]; then
      echo "error: deepspeed/webdataset missing and no .whl/ here: run bash ../shared/device/prepare-wheels.sh" >&2
      exit 2
    fi
    # the install line of prepare-wheels.sh's header
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 2
    export PATH=/tmp/site/bin:$PATH
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed .whl/ into /tmp/site in $(( $(date +%s) - T0 )) s"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this checkout's vitscale (no console script needed)
OUT=${OUT:-}
python3 benchmarks/quick.py ${OUT:+--out "$OUT"}
rc=$?
echo "gpu_quick: $(( $(date +%s) - T0 )) s in all (exit $rc: 0 = every row measured)"
exit $rc
