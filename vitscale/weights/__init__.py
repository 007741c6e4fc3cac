"""Weights in and out of vitscale's models: one reader for every source (run/checkpoint directories, exports, timm
state dicts, the MAE release), one key mapping, one position-table resampler. Training (``model.init``),
evaluation and analysis all load through here."""
from vitscale.weights.fit import encoder_of, fit_state_dict
from vitscale.weights.load import load_model
from vitscale.weights.sources import Weights, WeightsError, read_weights

__all__ = ["Weights", "WeightsError", "encoder_of", "fit_state_dict", "load_model", "read_weights"]
