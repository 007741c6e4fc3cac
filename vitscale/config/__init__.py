from vitscale.config.load import load_config, save_config, config_to_dict
from vitscale.config.resolve import Resolved, resolve
from vitscale.config.schema import Config

__all__ = ["Config", "Resolved", "load_config", "resolve", "save_config", "config_to_dict"]
