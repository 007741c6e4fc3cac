"""Transformer building blocks with timm's parameter names (so state dicts load both ways).

Initialisation lives in each leaf layer's own ``reset_parameters`` (xavier-uniform weights, zero bias), not
in a pass over the finished model. That keeps construction a pure function of the RNG and keeps it correct
under DeepSpeed's ``zero.Init``, which shards every layer's parameters as soon as that layer is built.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

LN_EPS = 1e-6  # timm's and the MAE code's LayerNorm epsilon


def LayerNorm(dim: int) -> nn.LayerNorm:  # noqa: N802 (reads like a class at call sites)
    return nn.LayerNorm(dim, eps=LN_EPS)


@torch.no_grad()
def xavier_uniform_fp32_(weight: torch.Tensor) -> None:
    """xavier-uniform, drawn in fp32 whatever the weight's dtype: torch's ``uniform_`` draws other values for a
    bf16 tensor than for an fp32 one from the same RNG state, and ZeRO-3 in bf16 builds the layers in bf16
    (``zero.Init``), so its initial weights were another draw than ZeRO 0-2's (which build in fp32, then cast)."""
    if weight.dtype == torch.float32:
        nn.init.xavier_uniform_(weight)
        return
    drawn = weight.new_empty(weight.shape, dtype=torch.float32)  # zero.Init recasts torch.empty's result to bf16
    nn.init.xavier_uniform_(drawn)
    weight.copy_(drawn)


class Linear(nn.Linear):
    """``nn.Linear`` initialised xavier-uniform with zero bias (the MAE / JAX-ViT scheme)."""

    def reset_parameters(self) -> None:
        xavier_uniform_fp32_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` projection, then ``proj``. ``qk_norm`` normalises each head's
    queries and keys (LayerNorm over the head width, timm's ``q_norm``/``k_norm``), which keeps attention logits
    bounded in long or large-LR runs (Dehghani et al., ViT-22B)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attn: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = None
        if return_attn:
            # Explicit softmax so the probabilities can be returned (B, heads, N, N).
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return (out, attn) if return_attn else out


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learned residual scale (CaiT), initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Re-initialising a model (eval's random-init baseline) walks every leaf's reset_parameters; without this
        # the trained gammas would survive it.
        self.gamma.fill_(float(self.init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branch with probability ``drop_prob``, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DP(LS(attn(LN(x)))), then x + DP(LS(mlp(LN(x))))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, drop_path: float = 0.0, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, mlp_hidden_dim: Optional[int] = None, qk_norm: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                              qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim or int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attn: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if return_attn:
            y, attn = self.attn(self.norm1(x), return_attn=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x


def checkpoint_count(setting: Union[bool, int], total: int) -> int:
    """``model.grad_checkpointing`` -> how many blocks to recompute in backward, counted from the first block in
    forward order: True = all ``total``, False = none, an int N = the first N (more than ``total`` = all).

    Why the first N: ViT blocks are identical, so which N are recomputed does not change memory or time, and a
    leading run is simple to state and to plan; the first blocks' activations are also the longest-lived."""
    if isinstance(setting, bool):
        return total if setting else 0
    if int(setting) < 0:
        raise ValueError(f"grad_checkpointing must be true, false or a number of blocks >= 0, got {setting}")
    return min(int(setting), total)


def run_blocks(blocks: nn.ModuleList | nn.Sequential, x: torch.Tensor,
               checkpointing: Union[bool, int]) -> torch.Tensor:
    """Apply ``blocks`` in order; the first ``checkpointing`` blocks (all if True) are recomputed in backward when
    grad is enabled."""
    n = checkpoint_count(checkpointing, len(blocks)) if torch.is_grad_enabled() else 0
    for i, blk in enumerate(blocks):
        x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if i < n else blk(x)
    return x
