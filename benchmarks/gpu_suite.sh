#!/usr/bin/env bash
# Issue 12: the GPU benchmark suite, written to run unattended on ONE H100 (80 GB) from the repository root.
# In a short GPU window run benchmarks/gpu_quick.sh first (issue 18: <= 6 min, one table); this suite is the long form.
#
#   bash benchmarks/gpu_suite.sh                # everything; results in benchmarks/results/<date>/*.json + suite.log
#   ONLY=vit_l16 bash benchmarks/gpu_suite.sh   # one section (names below: vit_l16, vit_h14, zero3, mae, loader,
#                                               # vit_e, plan)
#
# Before: pip install -e .  (a GPU box without registry access: bash ../shared/device/prepare-wheels.sh here, then
# the install line in its header there). Every command is a plain `vitscale bench/plan`: one process, DeepSpeed on
# NCCL with world size 1, bf16 (engine: DeepSpeed bf16 params + fp32 master; model-only: torch.autocast bf16),
# torch.cuda.synchronize() around every timed round, torch.cuda.max_memory_allocated() per mode, MFU against the
# H100's 989 TFLOP/s dense bf16 (vitscale.logging.metrics.PEAK_FLOPS). 224 px everywhere.
#
# Reference figures on one H100 (bf16, 224 px; /work/shared/DESIGN.md): timm ViT-L/16 878 img/s eager, 1082
# compiled; the same model under DeepSpeed ZeRO-2 714, ZeRO-3 292; PyTorch FSDP2 944 eager, 1028 compiled blocks;
# timm-block MAE ViT-L/16 1981 eager, 2601 compiled; MAE ViT-H/14 944 eager.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/$(date +%F)}
ONLY=${ONLY:-all}
# Shards for the loader/step modes. demo:photos (96 px JPEG crops, built on first use) only exercises the code;
# point SHARDS at real ImageNet shards (e.g. /data/in1k/train/manifest.json) for a meaningful loader figure.
SHARDS=${SHARDS:-demo:photos}
WORKERS=${WORKERS:-10}              # DataLoader workers per GPU (the recipes use 10 on a 16-core share)
ITERS=${ITERS:-20}                  # timed steps per round; 3 rounds, median reported; 5 warmup steps
COMMON=(--iters "$ITERS" --warmup 5 --rounds 3)
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

run() {  # run NAME vitscale-args... : print, run, keep going on failure (an OOM is a result too)
  local name=$1; shift
  echo "=== $name: vitscale $*" | tee -a "$OUT/suite.log"
  if ! vitscale "$@" 2>&1 | tee -a "$OUT/suite.log"; then
    echo "=== $name FAILED (see above)" | tee -a "$OUT/suite.log"
  fi
}
want() { [[ "$ONLY" == all || "$ONLY" == "$1" ]]; }

# Supervised L/16 recipe without checkpointing, so it is comparable with timm's eager 878 img/s.
SUP_L16=(--config configs/sup_vit_l16.yaml model.grad_checkpointing=false model.drop_path=0.0 data.batch_size=128)

if want vit_l16; then
  # 1. ViT-L/16 ZeRO-2 bf16: our model eager vs timm eager (same batch, AdamW, autocast), and our DeepSpeed step.
  #    Compare: timm 878, DeepSpeed ZeRO-2 714. plan says ~25 GB without checkpointing at 128/GPU.
  run vit_l16_zero2 bench "${SUP_L16[@]}" --what model,engine "${COMMON[@]}" --json "$OUT/vit_l16_zero2.json"
  # 1a. the price of the per-micro-batch non-finite-loss check (one 2-float all-reduce and a host sync):
  #     the same engine step with train.skip_nonfinite=false.
  run vit_l16_zero2_nocheck bench "${SUP_L16[@]}" train.skip_nonfinite=false --what engine "${COMMON[@]}" \
      --json "$OUT/vit_l16_zero2_nocheck.json"
  # 1b. the same with every block torch.compile'd (ours and timm). Compare: timm compiled 1082.
  run vit_l16_compiled bench "${SUP_L16[@]}" --what model --compile "${COMMON[@]}" --json "$OUT/vit_l16_compiled.json"
fi

if want vit_h14; then
  # 2. ViT-H/14 ZeRO-2 bf16 at 64/GPU, no checkpointing (~32 GB planned).
  run vit_h14 bench "${SUP_L16[@]}" model.name=vit_huge_patch14 data.batch_size=64 --what model,engine \
      "${COMMON[@]}" --json "$OUT/vit_h14.json"
  # 3. ViT-H/14 with gradient checkpointing at 2x the batch (128/GPU; ~16 GB planned instead of ~52 GB):
  #    the price of recomputation is one extra forward, ideally ~25% fewer img/s at the same MFU definition.
  run vit_h14_ckpt_2x bench "${SUP_L16[@]}" model.name=vit_huge_patch14 data.batch_size=128 \
      model.grad_checkpointing=true --what model,engine "${COMMON[@]}" --json "$OUT/vit_h14_ckpt_2x.json"
fi

if want zero3; then
  # 4. ZeRO-3 vs ZeRO-2 on ViT-L/16 (engine only; 1 GPU: sharding buys nothing, so this is pure overhead).
  #    Compare: DeepSpeed ZeRO-2 714 vs ZeRO-3 292, FSDP2 944.
  run vit_l16_zero3 bench "${SUP_L16[@]}" engine.zero_stage=3 --what engine "${COMMON[@]}" \
      --json "$OUT/vit_l16_zero3.json"
fi

if want mae; then
  # 5. MAE ViT-L/16 (mask 0.75, norm-pix loss) at 256/GPU: ours vs the timm-block MAE of the paper's code, eager
  #    and compiled, and our engine. Compare: timm-block MAE L/16 1981 eager, 2601 compiled.
  run mae_l16 bench --config configs/mae_vit_l16.yaml data.batch_size=256 --what model,engine "${COMMON[@]}" \
      --json "$OUT/mae_l16.json"
  run mae_l16_compiled bench --config configs/mae_vit_l16.yaml data.batch_size=256 --what model --compile \
      "${COMMON[@]}" --json "$OUT/mae_l16_compiled.json"
  # MAE ViT-H/14 at 128/GPU, no checkpointing (~26 GB planned). Compare: 944 eager.
  run mae_h14 bench --config configs/mae_vit_h14.yaml data.batch_size=128 model.grad_checkpointing=false \
      --what model,engine "${COMMON[@]}" --json "$OUT/mae_h14.json"
fi

if want loader; then
  # 6. Loader vs synthetic: the same MAE L/16 step fed by the real loader (step) vs a synthetic batch (engine);
  #    the loader alone must exceed the engine's img/s or training is input-bound (see data_wait).
  run mae_l16_loader bench --config configs/mae_vit_l16.yaml data.batch_size=256 data.train_shards="$SHARDS" \
      data.num_workers="$WORKERS" --what engine,loader,step --no-timm "${COMMON[@]}" --json "$OUT/mae_l16_loader.json"
  # The same with JPEGs decoded on the GPU (nvJPEG; workers only read headers and draw crops): does it close the
  # gap between step and engine when the host cores are the bottleneck?
  run mae_l16_loader_gpu_decode bench --config configs/mae_vit_l16.yaml data.batch_size=256 \
      data.train_shards="$SHARDS" data.num_workers="$WORKERS" data.decode_on=device --what engine,step --no-timm \
      "${COMMON[@]}" --json "$OUT/mae_l16_loader_gpu_decode.json"
  # Our loader vs torchvision ImageFolder vs decode-only on this box's cores (generated 256-500 px JPEGs).
  run data_loaders bench --what data --images 4096 --workers "$WORKERS" --batch-size 256 --batches 20 \
      --json "$OUT/data_loaders.json"
fi

if want vit_e; then
  # 7. ViT-e/14 (3.8B params) on one GPU, batch 16, gradient checkpointing: without offload the plan is 72.8 GB
  #    (too close to 80); with optimizer offload (fp32 master + moments + fp32 grads, 57 GB, in host RAM) ~17 GB.
  #    Needs ~64 GB free host RAM; the client optimizer is torch AdamW on the host: expect seconds per step.
  run vit_e_offload bench --config configs/sup_vit_l16.yaml model.name=vit_e_patch14 data.batch_size=16 \
      model.grad_checkpointing=true engine.offload_optimizer=true --what engine --no-timm \
      --iters 5 --warmup 2 --rounds 3 --json "$OUT/vit_e_offload.json"
fi

if want plan; then
  # 8. Check the memory planner against max_memory_allocated of real steps (prints plan/measured).
  run plan_l16 plan "${SUP_L16[@]}" --measure --json "$OUT/plan_l16.json"
  run plan_h14_ckpt plan "${SUP_L16[@]}" model.name=vit_huge_patch14 model.grad_checkpointing=true --measure \
      --json "$OUT/plan_h14_ckpt.json"
  run plan_mae_l16 plan --config configs/mae_vit_l16.yaml data.batch_size=256 --measure --json "$OUT/plan_mae_l16.json"
  run plan_l16_zero3 plan "${SUP_L16[@]}" engine.zero_stage=3 --measure --json "$OUT/plan_l16_zero3.json"
fi
echo "results: $OUT"
