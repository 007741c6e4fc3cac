"""Regional compilation: ``torch.compile`` on each transformer block, in place (``train.compile``).

Why per block and not the whole model: every block has the same code and shapes, so one compiled graph serves
all of them (compile time stays that of one block, torchtitan's reason), and the glue around the blocks (patch
embedding, MAE masking and unshuffling, the loss) stays eager, where it is cheap and data-dependent. What is compiled is
each block's ``forward``, not its ``__call__``: module hooks (ZeRO-3's parameter gathering, which the engine
installs once per block, see ``engine.initialize``) run eagerly around the compiled graph instead of splitting it.
Gradient checkpointing wraps the compiled block (``checkpoint(block, x)`` recomputes with the same graph).

In place means an instance attribute ``block.forward``: the module tree, and so every parameter name in a
checkpoint or an export, is unchanged; no ``_orig_mod.`` prefix appears anywhere.

A compiler that cannot work here (no C compiler for inductor on a CPU host, no Triton, a broken backend) must not
stop a training run: it costs one warning and the blocks run eagerly, with the same arithmetic.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

# The torch.compile backend. A module constant (not a config key) so that tests can force a failure.
BACKEND: Any = "inductor"


def _compiler_errors() -> tuple[type, ...]:
    """What a failing compiler raises when a block first runs. Narrow on purpose: the non-reentrant checkpoint's
    recomputation stops early by raising through the block (``_StopRecomputationError``), and an OOM or a bug in
    the model must surface as themselves, not as a silent switch to eager."""
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:  # older torch
        pass
    return tuple(errors)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a vitscale model (ViT, MAE encoder + decoder) or of a timm reference model,
    in forward order."""
    enc = getattr(model, "encoder", model)
    blocks = list(getattr(enc, "blocks", []))
    blocks += list(getattr(model, "decoder_blocks", []))
    return blocks


def _root_cause(why: BaseException) -> str:
    """The innermost error's type and first line (dynamo wraps a backend's error in BackendCompilerFailed)."""
    for _ in range(10):  # bounded: a chain is a few links long
        inner = getattr(why, "inner_exception", None) or why.__cause__
        if inner is None:
            break
        why = inner
    text = str(why).strip()
    return f"{type(why).__name__}: {text.splitlines()[0][:300]}" if text else type(why).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _Regional:
    """The compiled blocks of one model; on the first failure every block goes back to eager, once."""

    def __init__(self, blocks: list[nn.Module], warn: Callable[[str], None]):
        self.blocks, self.warn, self.failed = blocks, warn, False

    def eager(self, why: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.warn(f"train.compile: torch.compile failed ({_root_cause(why)}); "
                      "the transformer blocks run eagerly instead (same results, slower)")
        for blk in self.blocks:
            blk.__dict__.pop("forward", None)  # the class's forward again

    def guarded(self, blk: nn.Module, compiled: Callable) -> Callable:
        eager = type(blk).forward.__get__(blk)

        def forward(*args, **kwargs):
            if self.failed:
                return eager(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except _compiler_errors() as why:
                self.eager(why)
                return eager(*args, **kwargs)
        return forward


def _probe(backend: Any, device: torch.device) -> None:
    """Compile and run a two-op function: catches a missing C compiler / Triton before the model runs."""
    fn = torch.compile(lambda x: torch.relu(x) * 2.0 + 1.0, backend=backend, dynamic=False)
    fn(torch.ones(8, device=device))


def compile_blocks(model: nn.Module, device: Optional[torch.device] = None, backend: Any = None,
                   warn: Callable[[str], None] = _warn) -> bool:
    """Compile each transformer block of ``model`` in place; returns False (after one warning) if the compiler
    does not work here, in which case the model is left eager. Failures that only show when a block first runs
    (code generation for an unusual shape) are caught there too: one warning, then every block runs eagerly."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"train.compile: found no transformer blocks in {type(model).__name__}")
    backend = BACKEND if backend is None else backend
    regional = _Regional(blocks, warn)
    try:
        _probe(backend, device or next(model.parameters()).device)
        for blk in blocks:
            blk.forward = regional.guarded(blk, torch.compile(blk.forward, backend=backend))
    except Exception as why:  # noqa: BLE001 (whatever stops the compiler here: no C compiler, no Triton, ...)
        regional.eager(why)
        return False
    return True


def is_compiled(model: nn.Module) -> bool:
    """True if the model's blocks currently run compiled (False after a fallback to eager)."""
    blocks = transformer_blocks(model)
    return bool(blocks) and all("forward" in b.__dict__ for b in blocks)
