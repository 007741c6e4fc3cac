#!/usr/bin/env bash
# The CPU figures in docs/benchmarks.md (measured 2026-11-25 on a shared 2-core machine), re-runnable anywhere:
#   bash benchmarks/cpu_suite.sh            # results in benchmarks/results/cpu-<date>/*.json + suite.log
# No GPU, no download: demo shards are built from scikit-learn / scikit-image data on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cpu-$(date +%F)}
CACHE=${CACHE:-data_cache}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

run() {
  local name=$1; shift
  echo "=== $name: vitscale $*" | tee -a "$OUT/suite.log"
  vitscale "$@" 2>&1 | grep -v "\[WARNING\]" | tee -a "$OUT/suite.log"
}

# Throughput: model alone (ours vs timm), engine step, loader, full step. One torch thread: steadier on a shared box.
run demo bench --config configs/demo.yaml data.cache_dir="$CACHE" --threads 1 --rounds 5 --json "$OUT/demo.json"
run demo_mae bench --config configs/demo_mae.yaml data.cache_dir="$CACHE" --threads 1 --rounds 5 \
    --json "$OUT/demo_mae.json"
run vit_ti16 bench --config configs/demo.yaml data.cache_dir="$CACHE" model.name=vit_tiny_patch16 \
    model.img_size=224 data.batch_size=16 data.train_shards=demo:photos --threads 1 --iters 5 --rounds 3 \
    --json "$OUT/vit_ti16.json"

# Memory plan vs the live tensor bytes of a real engine step (small gradient bucket, see docs/benchmarks.md).
TINY=(model.embed_dim=64 model.depth=2 model.num_heads=2 data.batch_size=16 data.num_workers=0
      engine.ds_config.zero_optimization.reduce_bucket_size=50000)
run plan_tiny_bf16_z2 plan --config configs/demo.yaml "${TINY[@]}" train.precision=bf16 --measure \
    --json "$OUT/plan_tiny_bf16_z2.json"
run plan_tiny_mae_ckpt_z1 plan --config configs/demo.yaml "${TINY[@]}" objective.name=mae \
    model.grad_checkpointing=true \
    train.precision=fp32 engine.zero_stage=1 --measure --json "$OUT/plan_tiny_mae_ckpt_z1.json"
run plan_ti16_fp32_z2 plan --config configs/demo.yaml model.name=vit_tiny_patch16 model.img_size=224 \
    data.batch_size=16 data.num_classes=1000 engine.ds_config.zero_optimization.reduce_bucket_size=1000000 \
    --measure --json "$OUT/plan_ti16_fp32_z2.json"
run plan_ti16_default_bucket plan --config configs/demo.yaml model.name=vit_tiny_patch16 model.img_size=224 \
    data.batch_size=16 data.num_classes=1000 --measure --json "$OUT/plan_ti16_default_bucket.json"

# Data loaders: ours (shards) vs torchvision ImageFolder vs decode-only, 512 JPEGs of 256-500 px, 2 workers.
run data bench --what data --json "$OUT/data.json"
# The PIL draft() lever on large images (crops >= 2x the output are common only here).
run data_large bench --what data --images 256 --min-size 800 --max-size 1400 --json "$OUT/data_large.json"
echo "results: $OUT"
