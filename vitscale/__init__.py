"""vitscale: pretrain Vision Transformers at scale (WebDataset -> DeepSpeed ZeRO ViT, MAE or supervised)."""
__version__ = "0.1.0"
