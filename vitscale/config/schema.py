"""The one list of options. Every option has one name, a default and a docstring (the comment above it).

Config files and `key=value` overrides are validated against these dataclasses by `config.load`;
anything not declared here is an error naming the closest valid key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class RunConfig:
    # Parent directory of all runs; this run lives in <dir>/<name>.
    dir: str = "runs"
    # Name of the run (its folder under run.dir).
    name: str = "default"
    # Seed for model init, data order and augmentation: the run is a function of (config, seed, checkpoint).
    seed: int = 0


@dataclass
class ModelConfig:
    # Registered model name (`vit_base_patch16`, `vit_tiny_patch4`, or short forms like "B/16").
    name: str = "vit_tiny_patch16"
    # Input resolution (square) in pixels.
    img_size: int = 224
    # Override the variant's patch size (None keeps the name's).
    patch_size: Optional[int] = None
    # Override the variant's width (None keeps the name's).
    embed_dim: Optional[int] = None
    # Override the variant's number of blocks (None keeps the name's).
    depth: Optional[int] = None
    # Override the variant's number of attention heads (None keeps the name's).
    num_heads: Optional[int] = None
    # Classifier pooling: "token" ([CLS]) or "avg" (mean of patch tokens).
    global_pool: str = "token"
    # Stochastic depth rate at the last block (linearly increasing over depth).
    drop_path: float = 0.0
    # Recompute blocks' activations in backward to save memory: true = every block, false = none, an int N = the
    # first N blocks in forward order (MAE: encoder blocks, then decoder blocks); the dial between memory and speed.
    grad_checkpointing: Union[bool, int] = False
    # MAE decoder width, depth and heads (None keeps the variant's: 512 x 8 x 16 as in the paper; micro 128 x 2 x 4).
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    # MAE decoder MLP width / embed width (None = model.mlp_ratio).
    decoder_mlp_ratio: Optional[float] = None
    # Position embedding: "learn" (1-D learned table), "sincos" (fixed 2-D sin-cos) or "none"; None keeps the
    # model's (ViT: learn; MAE encoder: sincos, as in the paper).
    pos_embed: Optional[str] = None
    # Prepend a [CLS] token. Without one, supervised training needs model.global_pool=avg.
    class_token: bool = True
    # MLP width / embed width (None keeps the variant's: 4, or the paper's value for giant/gigantic/e).
    mlp_ratio: Optional[float] = None
    # Bias on the attention's qkv projection.
    qkv_bias: bool = True
    # Per-head LayerNorm on attention queries and keys (timm's qk_norm; ViT-22B's fix for exploding logits).
    qk_norm: bool = False
    # Learned register tokens after [CLS] (Darcet et al.; timm's reg_tokens; 0 = none). They get position rows like
    # [CLS] (timm's default layout), are never masked by MAE, and pooling, probes and attention analysis skip them.
    reg_tokens: int = 0
    # LayerScale: initial value of the per-channel residual scales (None = no LayerScale; CaiT uses 1e-5..0.1).
    init_values: Optional[float] = None
    # Final LayerNorm after pooling (fc_norm) instead of before it; None = after when global_pool=avg (timm).
    fc_norm: Optional[bool] = None
    # Dropout after the position embedding and before the head (timm's drop_rate).
    drop_rate: float = 0.0
    # Dropout on the attention probabilities.
    attn_drop_rate: float = 0.0
    # Dropout after the attention and MLP projections.
    proj_drop_rate: float = 0.0
    # Start the weights (not the optimizer or step) from: a run or checkpoint directory (latest complete), a
    # `vitscale export` file, a timm state dict (.safetensors/.pth/.bin) or an MAE release .pth ("" = random init).
    # The head starts fresh when the class count differs, an MAE decoder is dropped, pos_embed is resampled to
    # model.img_size; anything else that does not fit is an error. Ignored when the run resumes from a checkpoint.
    init: str = ""
    # Std of the classifier head's initial weights (truncated normal, bias 0) when it starts fresh; MAE uses 2e-5
    # for fine-tuning, 0.01 for linear probing; 0 = zeros (the ViT paper). null = the layer's default (xavier-uniform).
    head_init_std: Optional[float] = None
    # Parameters that do not train: "encoder" (everything but the head: linear probing) or comma-separated
    # parameter-name prefixes, e.g. "patch_embed,blocks.0" ("" = train everything).
    freeze: str = ""
    # A BatchNorm without affine parameters before the head (MAE's linear probe).
    head_norm: bool = False
    # Width of the ViT paper's pre-training head's hidden layer (dense + tanh before the classifier, "pre-logits";
    # supervised only). null = none: the paper fine-tunes without it, and model.init drops it from a source.
    representation_size: Optional[int] = None


@dataclass
class ObjectiveConfig:
    # "supervised" (classification with labels) or "mae" (masked autoencoder): a name in
    # vitscale.objectives.OBJECTIVES, or the import path of an Objective subclass ("package.module:Class").
    name: str = "supervised"
    # MAE: fraction of patches hidden from the encoder.
    mask_ratio: float = 0.75
    # MAE: normalise each target patch by its own mean/std (the paper's better setting).
    norm_pix_loss: bool = True
    # Supervised: label smoothing for the cross-entropy loss.
    label_smoothing: float = 0.0


@dataclass
class DataConfig:
    # Training shards: brace pattern ("d/train-{000000..000099}.tar"), manifest.json, or "demo:digits" /
    # "demo:photos" / "demo:nature" / "demo:scenes" to build the demo shards on first use. Or several sources drawn
    # at fixed proportions: a list of {shards: SPEC, weight: W, name: NAME} or "0.7*SPEC_A + cc=0.3*SPEC_B" (docs/data.md, "Mixing").
    train_shards: Union[str, list] = "demo:digits"
    # Held-out shards for the end-of-run evaluation (same forms as train_shards; "" or null = no evaluation).
    val_shards: Optional[str] = ""
    # Where demo shards are built and cached.
    cache_dir: str = "data_cache"
    # Number of classes for supervised training (0 = read from the shard manifest).
    num_classes: int = 0
    # Samples per GPU (per process) per micro-step.
    batch_size: int = 64
    # Global batch per optimizer step (null = batch_size x grad_accum x world size). When set, batch_size is
    # derived from it at launch (global / (world size x train.grad_accum), which must divide evenly), so a recipe
    # keeps its global batch, and its LR, on any number of GPUs.
    global_batch_size: Optional[int] = None
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 2
    # Shuffle shards each epoch and samples within a shard (seeded from run.seed, so resumable).
    shuffle: bool = True
    # Random-resized-crop scale range for training (lower bound).
    crop_min_scale: float = 0.35
    # Fraction of bad samples (corrupt images) tolerated before the run stops with an error.
    max_bad_fraction: float = 0.01
    # Where training JPEGs are decoded: "worker" (DataLoader workers, CPU) or "device" (workers only read the
    # header and draw the crop; the trainer decodes the batch on its device: nvJPEG on GPUs). Same images either way.
    decode_on: str = "worker"
    # Shards each DataLoader worker reads at once and interleaves (a "block"; lowered for an epoch when there are
    # fewer than shards_in_flight shards per reader). 16 mixes up to 16 classes per batch from class-sorted shards
    # and costs one open file each. See docs/data.md.
    shards_in_flight: int = 16
    # Samples each worker buffers to shuffle its block's stream (encoded bytes: ~110 MB at ImageNet's ~110 KB per
    # JPEG). Bounds a worker's memory, whatever the shard size; the first sample comes after this many are read.
    shuffle_buffer: int = 1000
    # Where a sample's label is: "cls" (<key>.cls), "txt" (<key>.txt) or "json:FIELD" (a field of <key>.json,
    # dotted for nested fields, e.g. json:label). Supervised runs skip and count samples without a valid one.
    label_key: str = "cls"
    # Images with more pixels than this (read from the header, before decoding) are skipped and counted; the
    # default is PIL's decompression-bomb limit (~89 Mpx). 0 = no limit.
    max_pixels: int = 89_478_485
    # Fine-tuning augmentation from timm's library (seeded from the data stream: exact resume).
    # RandAugment config after the crop, e.g. "rand-m9-mstd0.5-inc1" (MAE/DeiT fine-tuning); "" = none.
    randaug: str = ""
    # Mixup alpha (0 = off); the labels become soft targets (objective.label_smoothing folded in).
    mixup: float = 0.0
    # CutMix alpha (0 = off).
    cutmix: float = 0.0
    # Probability that a batch is mixed at all (when mixup or cutmix is on).
    mixup_prob: float = 1.0
    # Probability of CutMix instead of Mixup when both are on.
    mixup_switch_prob: float = 0.5
    # RandomErasing probability per image (per-pixel random fill, after normalisation; 0 = off).
    random_erasing: float = 0.0
    # Held-out images: resize the shorter side to img_size / eval_crop_pct, then centre-crop img_size.
    eval_crop_pct: float = 0.875
    # How every resize interpolates (training crops, RandAugment, held-out images; antialiased): "bilinear" (the
    # cheaper) or "bicubic" (MAE's and timm's pipelines; ~0.25 ms more per 224-px image on one core).
    interpolation: str = "bilinear"


@dataclass
class OptimConfig:
    # "adamw", "sgd" (momentum; the ViT paper's fine-tuning) or "lars" (MAE's linear probe; needs ZeRO-0, fp32).
    name: str = "adamw"
    # SGD/LARS momentum.
    momentum: float = 0.9
    # Absolute peak learning rate; if null, lr = blr * global_batch / 256.
    lr: Optional[float] = None
    # Base learning rate per 256 samples (used when optim.lr is null).
    blr: float = 1.0e-3
    # AdamW weight decay (not applied to norms, biases, position embeddings, special tokens).
    weight_decay: float = 0.05
    # AdamW betas.
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # Linear warmup steps from 0 to the peak LR (null: from optim.warmup_epochs, or 100 when that is null too).
    warmup_steps: Optional[int] = None
    # Warmup in passes over the training data, the recipe's unit: optim.warmup_steps = ceil(epochs x samples / global
    # batch), the samples from the shard manifest. Set this or optim.warmup_steps, not both.
    warmup_epochs: Optional[float] = None
    # The decay after warmup ends at this LR.
    min_lr: float = 0.0
    # LR decay after warmup: "cosine" (MAE, DeiT) or "linear" (the ViT paper's pretraining), down to optim.min_lr.
    schedule: str = "cosine"
    # Layer-wise LR decay factor (1.0 = off); earlier blocks get lr * layer_decay^(depth - i).
    layer_decay: float = 1.0
    # Clip the global gradient norm to this value (0 = no clipping).
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    # Total optimizer steps of the run (null: from train.epochs, or 1000 when that is null too).
    steps: Optional[int] = None
    # Length in passes over the training data, as recipes are published: train.steps = ceil(epochs x samples / global
    # batch), the samples from the shard manifest (printed at start and saved as train.steps in the run's config.yaml).
    # Set this or train.steps, not both.
    epochs: Optional[float] = None
    # Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    # Numerics: "bf16", "fp16" (dynamic loss scaling) or "fp32".
    precision: str = "bf16"
    # Save a checkpoint every this many steps (and always at the end).
    ckpt_every: int = 500
    # Keep this many most recent complete checkpoints (0 = keep all).
    keep_last: int = 2
    # Write a metrics line every this many steps.
    log_every: int = 10
    # Validate on data.val_shards every this many steps (top-1, top-5, loss to metrics.jsonl and wandb; a checkpoint
    # at each new best top-1, pointed at by checkpoints/best). 0 = only at the end of the run.
    eval_every: int = 0
    # "auto" (latest complete checkpoint if any), "never", or a checkpoint directory path.
    resume: str = "auto"
    # Model EMA: an fp32 exponential moving average of the weights with this decay per update (0 = off; e.g.
    # 0.9999). Each rank averages only the part of the weights it holds (ZeRO-3: its partition), saved in the
    # checkpoint; periodic validation also reports it (val_top1_ema) and `vitscale export --ema` writes it.
    ema_decay: float = 0.0
    # EMA warmup as timm's ModelEmaV3: the decay at step t is min(ema_decay, 1 - t^(-2/3)), so early weights fade fast.
    ema_warmup: bool = False
    # Update the EMA every this many optimizer steps (the decay applies per update, as in timm).
    ema_every: int = 1
    # The periodic-validation number that picks checkpoints/best: "val_top1" (the weights) or "val_top1_ema".
    best_metric: str = "val_top1"
    # Show a tqdm progress bar on rank 0.
    progress: bool = True
    # Check every micro-batch's loss on every rank (one tiny all-reduce); a NaN/Inf loss skips that micro-batch
    # on all ranks before its backward, so it never reaches the weights.
    skip_nonfinite: bool = True
    # After this many non-finite losses in a row, reload the last checkpoint and lower the LR.
    rollback_after: int = 5
    # Each rollback multiplies the LR by this for the rest of the run.
    rollback_lr_factor: float = 0.5
    # Stop with an error instead of rolling back more than this many times.
    max_rollbacks: int = 3
    # torch.compile each transformer block in place (regional compilation; parameter names unchanged). A compiler
    # that does not work on this machine costs one warning and the run goes on eagerly.
    compile: bool = False


@dataclass
class EngineConfig:
    # DeepSpeed ZeRO stage: 0 (DDP-like), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters).
    zero_stage: int = 2
    # Keep optimizer states on CPU (ZeRO 1-3).
    offload_optimizer: bool = False
    # Keep parameters on CPU (ZeRO 3).
    offload_params: bool = False
    # Offload to NVMe files under this directory instead of CPU memory (null = CPU); needs DeepSpeed's async_io op.
    nvme_path: Optional[str] = None
    # Expert override: dict merged last into the generated DeepSpeed config.
    ds_config: dict = field(default_factory=dict)
    # Seconds a rank waits for another before the run stops with one line naming the rank that failed: a
    # collective that does not complete in this time fails, and a rank whose heartbeat stops for 3/4 of it
    # (killed, stopped, its host gone) is declared lost. Too small stops healthy runs whose ranks legitimately
    # wait on one another (rank 0 converting a large checkpoint to the universal layout, saves on a slow
    # filesystem); too large leaves every GPU idle that long after a failure (see docs/reliability.md).
    timeout_s: float = 300.0
    # Seconds between a preemption signal (SIGTERM/SIGUSR1) and the SIGKILL that follows it: the deepspeed
    # launcher's and Slurm's default KillWait are 30. A resumed run warns in one line when its last measured step
    # plus checkpoint write took longer (the preemption checkpoint would be lost; docs/multinode.md).
    preempt_grace_s: float = 30.0


@dataclass
class WandbConfig:
    # "online", "offline", "disabled", or "auto" (online when logged in, else offline).
    mode: str = "auto"
    # wandb project name.
    project: str = "vitscale"
    # wandb entity (team/user); null = wandb's default.
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # MAE: save (and log to wandb) a reconstruction grid every this many steps; 0 = only at the end.
    image_every: int = 0
    # Number of images in the reconstruction grid.
    image_count: int = 4
    # Peak dense TFLOP/s per GPU for MFU (null = from the built-in table: A100, H100, H200; MFU is omitted for
    # devices not in it, e.g. CPUs).
    peak_tflops: Optional[float] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def choices() -> dict[str, tuple[Any, ...]]:
    """Keys whose value must be one of a fixed set."""
    return {
        "model.global_pool": ("token", "avg"),
        "model.pos_embed": ("learn", "sincos", "none"),
        "data.decode_on": ("worker", "device"),
        "data.interpolation": ("bilinear", "bicubic"),
        "optim.name": ("adamw", "sgd", "lars"),
        "train.precision": ("bf16", "fp16", "fp32"),
        "train.best_metric": ("val_top1", "val_top1_ema"),
        "engine.zero_stage": (0, 1, 2, 3),
        "logging.wandb.mode": ("auto", "online", "offline", "disabled"),
    }
