"""Moved: models are loaded by :mod:`vitscale.weights` (one loader for training, evaluation and analysis). These
names stay importable from here for existing callers."""
from vitscale.weights.fit import encoder_of
from vitscale.weights.load import DEFAULT_NORM_PIX_LOSS, load_model, load_model_for_analysis

__all__ = ["DEFAULT_NORM_PIX_LOSS", "encoder_of", "load_model", "load_model_for_analysis"]
