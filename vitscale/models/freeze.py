"""``model.freeze``: which parameters do not train, and what that leaves autograd to record.

One implementation for the trainer (``vitscale.train.model_init`` freezes the built model before the engine wraps
it) and for the planner (``vitscale plan`` and ``preflight`` freeze the meta-device model, so a linear probe is
planned with its head's states and activations only).
"""
from __future__ import annotations

from torch import nn

from vitscale.errors import ConfigError

HEAD_PARAMS = ("head.", "head_norm.")  # what trains when model.freeze=encoder


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Stop gradients for the parameters ``spec`` names ("encoder" = all but the head); returns their names."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        return []
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    for item in items:
        if item == "encoder":
            hit = [n for n in names if not n.startswith(HEAD_PARAMS)]
        else:
            hit = [n for n in names if n == item or n.startswith(item.rstrip(".") + ".")]
        if not hit:
            raise ConfigError(f"model.freeze: {item!r} names no parameter (use 'encoder' or a prefix such as "
                              f"'blocks.0' or 'patch_embed')")
        frozen.update(hit)
    if len(frozen) == len(names):
        raise ConfigError(f"model.freeze={spec!r} freezes every parameter: nothing would train")
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return sorted(frozen)


def records_graph(model: nn.Module, part: nn.Module) -> bool:
    """Whether autograd records ``part``'s forward: some parameter of ``model`` registered up to ``part``'s last one
    trains (vitscale's models register their parameters in forward order). When none does, no input of ``part``
    needs a gradient and none of its own weights do, so it saves no activations and costs no backward."""
    own = {id(p) for p in part.parameters()}
    trained = seen = False
    for p in model.parameters():
        trained = trained or p.requires_grad
        if id(p) in own:
            seen = trained
    return seen if own else any(p.requires_grad for p in model.parameters())
