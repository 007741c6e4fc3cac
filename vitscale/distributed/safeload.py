"""Loading a file never runs code: the one way vitscale (and DeepSpeed, on vitscale's paths) unpickles a torch file.

A torch checkpoint is a pickle, and a pickle can name any callable to run while it is read. ``safe_load`` reads
with torch's weights-only unpickler, which builds tensors, plain containers (dict, list, tuple, set, OrderedDict),
numbers, strings, dtypes and sizes, plus the few named classes a caller allows; anything else is refused with one
line naming the file, before a single object of it is built. ``weights_only_loads`` routes every ``torch.load``
made inside it (DeepSpeed passes ``weights_only=False`` itself) through ``safe_load``.

Use ``safe_load`` for any torch file a user hands in (``model.init``, baselines, per-rank states).
"""
from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from vitscale.errors import CheckpointReadError

_TORCH_LOAD = torch.load  # the real one, captured before anyone patches it


def _reason(error: Exception) -> str:
    """torch's refusal is a paragraph; keep the line that says what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported global", "Unsupported operand", "Trying to", "WeightsUnpickler error")):
            return line.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(error).__name__


def safe_load(path: Union[str, os.PathLike, Any], map_location: Any = "cpu", *, allowed: Sequence[type] = (),
              mmap: Optional[bool] = None) -> Any:
    """``torch.load`` that can only build tensors, plain containers and the classes in ``allowed``.

    A file that needs anything else (a pickle that would call ``os.system``, open a file, import a module ...)
    raises :class:`CheckpointReadError` naming the file; nothing in it has run. So does a file cut short or
    damaged (one line instead of torch's traceback); a missing file raises ``FileNotFoundError``."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(f"{_name(path)} holds more than tensors and plain values; refusing to unpickle it "
                                  f"({_reason(e)})") from None
    except (OSError, MemoryError):
        raise  # a missing or unreadable file says so itself
    except Exception as e:  # cut short or damaged: torch raises RuntimeError, EOFError, UnicodeDecodeError, ...
        raise CheckpointReadError(f"{_name(path)} is not a readable torch file (cut short or damaged?): "
                                  f"{type(e).__name__}: {_reason(e)[:200]}") from None


def _name(path: Any) -> Path:
    return Path(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", repr(path)))


@contextlib.contextmanager
def weights_only_loads(allowed: Sequence[type] = ()) -> Iterator[None]:
    """Inside this block every ``torch.load`` (also a library's, whatever ``weights_only`` it passes) is
    :func:`safe_load` with ``allowed``. Processes forked inside the block (DeepSpeed's converter workers) inherit
    it. Not for threads that load files concurrently with other code: ``torch.load`` is patched process-wide."""

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_kwargs):
        return safe_load(f, map_location=map_location, allowed=allowed, mmap=mmap)

    saved, torch.load = torch.load, load
    try:
        yield
    finally:
        torch.load = saved
