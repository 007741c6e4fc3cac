from vitscale.config.load import ConfigError, load_config, save_config, config_to_dict
from vitscale.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "save_config", "config_to_dict"]
