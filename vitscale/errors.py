"""Errors whose message is written for the user: the CLI prints them as one line, without a traceback."""


class VitscaleError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ConfigError(VitscaleError, ValueError):
    """A config file or override is invalid; the message is one line naming the key."""


class DataError(VitscaleError, RuntimeError):
    """The training data cannot go on (e.g. more bad samples than data.max_bad_fraction allows)."""


class CheckpointWriteError(VitscaleError, RuntimeError):
    """A checkpoint could not be written; the message names it and the previous complete checkpoint."""


class TrainingDiverged(VitscaleError, RuntimeError):
    """Losses stayed non-finite and rolling back could not (or may no longer) help."""


class CheckpointReadError(VitscaleError, RuntimeError):
    """A checkpoint file is not what vitscale writes (e.g. it holds objects that loading would have to run)."""
