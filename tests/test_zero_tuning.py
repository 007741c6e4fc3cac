"""ZeRO-3 settings sized from the model (vitscale.distributed.zero_tuning; reasoning in docs/benchmarks.md)."""
import torch

from conftest import DEMO
from vitscale.bench.plan import model_shape, plan_memory
from vitscale.config.load import load_config
from vitscale.distributed.ds_config import build_ds_config
from vitscale.distributed.zero_tuning import ModelSizes
from vitscale.models import create_model


def _sizes(name, **kw):
    with torch.device("meta"):
        return ModelSizes.of(create_model(name, **kw))


def test_zero3_settings_for_vit_l16():
    sizes = _sizes("vit_large_patch16", num_classes=1000)
    block = 12 * 1024 ** 2 + 13 * 1024  # qkv, proj, fc1, fc2 weights + their biases + two norms
    assert (sizes.hidden, sizes.block_params) == (1024, block) and 304e6 < sizes.params < 305e6
    cfg = load_config(DEMO, ["model.name=vit_large_patch16", "model.img_size=224", "engine.zero_stage=3"])
    zero = build_ds_config(cfg, 8, sizes=sizes)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 2 * block == 25_192_448  # two blocks ahead
    assert zero["stage3_param_persistence_threshold"] == 8 * 1024  # norms and biases (<= 4096) stay whole
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 4 * block
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2 * block
    # the step runs 2-block sub-groups (its temporaries were 3 copies of the whole partition), capped at a
    # rank's share: DeepSpeed allocates a world x sub-group buffer once, at most one model as with its default
    assert zero["sub_group_size"] == 2 * block
    huge = build_ds_config(cfg, 64, sizes=sizes)["zero_optimization"]["sub_group_size"]
    assert huge == -(-sizes.params // 64) < 2 * block
    two = build_ds_config(load_config(DEMO, ["model.name=vit_large_patch16", "engine.zero_stage=2"]), 8,
                          sizes=sizes)["zero_optimization"]
    assert two["reduce_bucket_size"] == 2 * block and "sub_group_size" not in two  # not the whole model
    assert zero["contiguous_gradients"] and zero["overlap_comm"] == torch.cuda.is_available()
    # every weight matrix is sharded, every 1-D tensor of a block is not
    with torch.device("meta"):
        blk = create_model("vit_large_patch16").blocks[0]
    small = [n for n, p in blk.named_parameters() if p.numel() < zero["stage3_param_persistence_threshold"]]
    assert small and all(n.endswith(("bias", "norm1.weight", "norm2.weight")) for n in small)
    assert all(p.dim() == 1 for n, p in blk.named_parameters() if n in small)


def test_zero3_settings_for_a_tiny_model_and_user_overrides():
    sizes = _sizes("vit_micro_patch8", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    assert sizes.hidden == 32 and sizes.block_params == 12 * 32 ** 2 + 13 * 32
    cfg = load_config(DEMO, ["engine.zero_stage=3"])
    zero = build_ds_config(cfg, 1, sizes=sizes)["zero_optimization"]
    # buckets never below 1e6 elements (per-call overhead dominates); persistence 8 x 32: the 32x32 and larger
    # matrices are sharded (DeepSpeed's 1e5 would keep this whole model unsharded)
    assert zero["stage3_prefetch_bucket_size"] == zero["reduce_bucket_size"] == int(1e6)
    assert zero["stage3_param_persistence_threshold"] == 256
    user = load_config(DEMO, ["engine.zero_stage=3",
                              "engine.ds_config.zero_optimization.stage3_prefetch_bucket_size=123",
                              "engine.ds_config.zero_optimization.overlap_comm=false"])
    zero = build_ds_config(user, 1, sizes=sizes)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 123 and zero["overlap_comm"] is False
    assert zero["stage3_param_persistence_threshold"] == 256  # the rest stays sized
    # ZeRO-2 keeps its model-sized bucket and gets no ZeRO-3 keys
    two = build_ds_config(load_config(DEMO, ["engine.zero_stage=2"]), 1, sizes=sizes)["zero_optimization"]
    assert not any(k.startswith("stage3_") for k in two) and two["reduce_bucket_size"] == int(1e6)


def test_plan_uses_the_sized_zero3_settings():
    cfg = load_config(DEMO, ["model.name=vit_large_patch16", "model.img_size=224", "data.num_classes=1000",
                             "engine.zero_stage=2", "train.precision=bf16", "data.batch_size=32"])
    shape = model_shape(cfg, 1000)
    block = shape.sizes.block_params
    small = shape.small_params
    assert 0 < small < 0.01 * shape.params  # norms, biases, the [CLS] token
    row = plan_memory(cfg, gpus=1).row(3)
    # one reduce bucket (2 blocks) + the working set (prefetch 2 blocks + 2 blocks) + persistent params, bf16
    assert row.buffers == (2 * block + 4 * block + small) * 2


def test_buckets_are_aligned_for_odd_sized_models():
    """A model with an odd parameter count (a 5-class head on a 1M+-parameter ViT) once gave DeepSpeed an odd
    ZeRO-2 bucket, and initialize stopped on its NCCL alignment assert (the first GPU run's loader rows)."""
    sizes = _sizes("vit_small_patch16", img_size=64, depth=2, num_classes=5)
    assert sizes.params % 2 == 1 and sizes.params > 1e6
    for stage in (1, 2, 3):
        cfg = load_config(DEMO, [f"engine.zero_stage={stage}"])
        for kw in ({"sizes": sizes}, {"num_params": sizes.params}):
            zero = build_ds_config(cfg, 2, **kw)["zero_optimization"]
            buckets = [v for k, v in zero.items() if k.endswith("bucket_size")]
            assert buckets and all(b % 2 == 0 for b in buckets), (stage, zero)
            if stage < 3:  # ZeRO-1/2: two blocks when the model's sizes are known, else the whole (small) model
                whole = "num_params" in kw
                assert zero["reduce_bucket_size"] == (sizes.params + 1 if whole else 2 * sizes.block_params)
