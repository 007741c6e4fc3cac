"""What every objective provides, and the one mapping from ``model.*`` config keys to model keywords.

An objective owns everything that differs between MAE and supervised training, so the training loop, the
benchmarks and the loaders never ask which objective runs: which model it trains (:meth:`Objective.build_model`),
what a step costs (:meth:`Objective.flops_per_image`), the loss and its metrics (``__call__``), the held-out
evaluation (:meth:`Objective.eval_sums`) and the pictures it draws (:meth:`Objective.visualize`).
Objectives know models, not engines, ranks or files.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from vitscale.config.schema import Config
from vitscale.models.freeze import records_graph

# model.<key> -> keyword of ``vitscale.models.create_model`` (None values keep the variant's default). A new model
# option is one line here plus its field in config/schema.py.
MODEL_KWARGS = {
    "img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "class_token": "class_token",
    "pos_embed": "pos_embed", "fc_norm": "fc_norm", "init_values": "init_values", "drop_path": "drop_path_rate",
    "drop_rate": "drop_rate", "attn_drop_rate": "attn_drop_rate", "proj_drop_rate": "proj_drop_rate",
    "qk_norm": "qk_norm", "reg_tokens": "reg_tokens",
}


def model_kwargs(cfg: Config, keys: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """``create_model`` keywords from ``cfg.model`` (``keys``: config key -> keyword; default MODEL_KWARGS)."""
    return {kw: getattr(cfg.model, key) for key, kw in (keys or MODEL_KWARGS).items()}


@dataclass
class Picture:
    """A figure an objective wants saved (rank 0) and logged: ``draw(panels, path, title)`` writes the file."""
    key: str  # tracker key
    filename: str  # under RUN_DIR/images/
    title: str
    panels: torch.Tensor
    draw: Callable[[torch.Tensor, Path, str], Path]


class Objective(abc.ABC):
    """Base class; subclasses set ``name`` and implement the hooks. ``cfg`` is the whole run config."""
    name = ""
    classifies = False  # trains a classifier on labels (fine-tuning augmentation and periodic validation need one)

    # Features a frozen-feature probe (``vitscale eval``, ``--pool auto``) reads: "model" (the model's own
    # pre-logits: [CLS] or mean, then its norm) or "avg" (mean of the final normalised patch tokens).
    probe_pool = "model"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ----- the config (called by config.load.load_config: one line, before anything is written) ---------------
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError if ``cfg`` cannot train this objective (cross-key rules only it knows)."""

    # ----- a trained model outside its run: export, rebuilding from weights, pictures for analysis -------------
    @classmethod
    def export_part(cls, state_dict: dict[str, torch.Tensor], full: bool) -> tuple[dict[str, torch.Tensor], str]:
        """(tensors, part name) that ``vitscale export`` writes: the whole model unless the objective trains
        parts that downstream use does not need (``full`` keeps everything)."""
        return state_dict, "full"

    @classmethod
    def adopt(cls, state_dict: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        """For weights without vitscale metadata: the state dict in this objective's key layout if they are this
        objective's model (e.g. a released checkpoint of it), else None."""
        return None

    @classmethod
    def rebuild(cls, build: Callable[[int], nn.Module], state_dict: dict[str, torch.Tensor], part: str
                ) -> nn.Module:
        """The model ``state_dict`` (this objective's ``part``) loads into. ``build(num_classes)`` makes the
        run's model from its saved config (on the meta device); by default a classifier sized by its head."""
        head = state_dict.get("head.weight")
        return build(int(head.shape[0]) if head is not None else 0)

    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        """The ViT that sees the images (what probes, attention maps and robustness read)."""
        return model

    # ``vitscale bench``'s timm reference for this objective's model: "module:function(model, drop_path)", an import
    # path so that objectives need not import the benchmarks.
    timm_reference = "vitscale.bench.timm_ref:timm_vit"

    # The section ``vitscale analyze`` adds for this objective's models ("": none) and its options' defaults.
    analysis_section = ""

    @classmethod
    def analyze(cls, run: Any, mask_ratio: Optional[float], seed: int, norm_pix_loss: Optional[bool]
                ) -> Optional[dict[str, Any]]:
        """The :attr:`analysis_section` of analysis.json. ``run`` is the analysis in progress: ``model``,
        ``info`` (from ``vitscale.weights.load_model``), ``x`` (normalised images on the model's device),
        ``names``, ``out``, ``label``, ``note(text)`` and ``wrote(path)``. None: nothing applies."""
        return None

    # ----- planning: how the transformer blocks see tokens, and what the step keeps outside them ---------------
    def block_stacks(self, model: nn.Module) -> list[tuple[str, Any, int]]:
        """(name, blocks, tokens per image) for each stack of transformer blocks one training step runs."""
        enc = self.encoder(model)
        return [("blocks", enc.blocks, enc.patch_embed.num_patches + enc.num_prefix_tokens)]

    def outside_blocks_bytes(self, model: nn.Module, stacks: list, batch: int, b: int) -> int:
        """Activation bytes a micro-batch of ``batch`` keeps outside the blocks (besides the input images) for
        backward; ``stacks`` are the planner's (``.tokens``, ``.dim``), ``b`` bytes per compute element.
        By default a classifier: the final norm (all tokens for [CLS] pooling, else the pooled features) and
        the logits with their fp32 log-softmax."""
        st = stacks[0]
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()) and not records_graph(model, norm):
            out = batch * st.dim * b  # a frozen encoder: only the head's input is kept (model.freeze=encoder)
        elif getattr(model, "global_pool", "token") == "token":
            out = 2 * batch * st.tokens * st.dim * b  # final norm: its input, and its output kept by the [CLS] view
        else:
            out = 2 * batch * st.dim * b  # pooled features and fc_norm output
        return out + batch * getattr(model, "num_classes", 0) * (b + 4)

    def check_data(self, num_classes: int) -> None:
        """Raise if the training data cannot serve this objective (called before anything is written)."""

    def label_classes(self, num_classes: int) -> int:
        """How many classes a sample's label must fall in (0: labels are not used, any sample serves)."""
        return 0

    @abc.abstractmethod
    def build_model(self, num_classes: int) -> nn.Module:
        """The model this objective trains, from ``cfg.model`` (the one factory: see ``objectives.build_model``)."""

    @abc.abstractmethod
    def flops_per_image(self, model: nn.Module) -> float:
        """Training FLOPs per image of ``model``: forward + backward, 3 x forward when everything trains; frozen
        parts (``model.freeze``) have no weight-gradient backward, and no backward at all below the first trainable
        parameter (:func:`vitscale.models.flops.train_flops`)."""

    @abc.abstractmethod
    def __call__(self, model: Callable, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics): metrics are 0-d tensors, not synced to the host (the loop reads them on log steps)."""

    # The keys eval_sums returns, in a fixed order: every rank adds them up in one all-reduce.
    eval_keys: tuple[str, ...] = ("loss",)

    @abc.abstractmethod
    def eval_sums(self, model: Callable, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Held-out sums over the batch, one per :attr:`eval_keys` (e.g. {"loss": summed loss}); the loop reports
        val_<key> = sum / images."""

    def images_due(self, step: int, last: bool) -> bool:
        """Whether :meth:`visualize` should run after ``step``."""
        return False

    def visualize(self, model: Callable, module: nn.Module, images: torch.Tensor, step: int) -> Optional[Picture]:
        """A picture of what the model does on ``images`` (every rank runs it: ZeRO-3 forwards are collective)."""
        return None
