"""Frozen-feature evaluations: linear probe (MAE recipe), weighted kNN, few-shot ridge regression.

All three take :class:`~vitscale.eval.features.FeatureSet` s (features already extracted and gathered), so they
are cheap, deterministic functions of the features and a seed; every rank computes the same result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.eval.features import FeatureSet
from vitscale.logging.metrics import mean_std
from vitscale.optim import lr_at, peak_lr


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else float("nan")


# ----- linear probe ---------------------------------------------------------------------------------------------
class LinearProbeHead(nn.Module):
    """The MAE paper's linear-probe head: BatchNorm without affine parameters (it only whitens the features'
    scale, which differs a lot between pretraining methods) followed by a linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)  # as MAE's main_linprobe.py
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


def linear_probe(train: FeatureSet, val: FeatureSet, num_classes: int, *, epochs: int = 100, batch_size: int = 256,
                 blr: float = 0.1, weight_decay: float = 0.0, warmup_epochs: int = 10, seed: int = 0,
                 device: Optional[torch.device] = None) -> dict:
    """Train BatchNorm(affine=False) + Linear on frozen features with SGD (momentum 0.9), lr = blr x batch / 256,
    linear warmup then cosine (the MAE recipe, with SGD in place of LARS: the head is a single layer).

    Returns ``val_top1``, ``train_top1``, ``val_loss`` and per-epoch ``history`` (train loss, val accuracy)."""
    if epochs < 1 or batch_size < 1:  # a batch of 0 divides by zero; 0 epochs would score an untrained head
        raise ValueError(f"linear probe: epochs and batch size must be at least 1 (got {epochs} and {batch_size})")
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearProbeHead(train.features.shape[1], num_classes).to(device)
    x_train, y_train = train.features.to(device), train.labels.to(device)
    x_val, y_val = val.features.to(device), val.labels.to(device)
    batch_size = min(batch_size, len(train))
    lr = peak_lr(None, blr, batch_size)  # the one LR rule: blr x batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the ragged last batch: BatchNorm needs > 1 sample
    total = epochs * steps_per_epoch
    history, step = [], 0
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(len(train), generator=g).to(device)
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, warmup_epochs * steps_per_epoch, total)
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        head.eval()
        with torch.no_grad():
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                            "val_top1": _accuracy(head(x_val), y_val)})
    head.eval()
    with torch.no_grad():
        val_logits = head(x_val)
        return {"val_top1": _accuracy(val_logits, y_val), "train_top1": _accuracy(head(x_train), y_train),
                "val_loss": float(F.cross_entropy(val_logits, y_val)), "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "seed": seed, "history": history}


# ----- kNN ------------------------------------------------------------------------------------------------------
def knn_predict(train: FeatureSet, queries: torch.Tensor, num_classes: int, k: int, temperature: float,
                chunk: int = 1024, device: Optional[torch.device] = None) -> torch.Tensor:
    """Weighted kNN on cosine similarity (as in DINO / InstDisc): the k most similar training samples vote for
    their class with weight exp(similarity / temperature). Returns class scores (Q, num_classes) on the CPU;
    the similarity matrix is computed on ``device`` one chunk of queries at a time."""
    device = device or torch.device("cpu")
    bank = F.normalize(train.features.float().to(device), dim=1)
    bank_labels = train.labels.to(device)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float().to(device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes.cpu())
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def check_k(k: int, train_samples: int) -> None:
    """kNN's k must be a number of training samples there are: a silent clamp would report one k and compute
    another."""
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if k > train_samples:
        raise ValueError(f"--k {k} is more than the {train_samples} training samples: pass --k {train_samples} "
                         f"or less")


def knn_eval(train: FeatureSet, val: FeatureSet, num_classes: int, *, k: int = 20, temperature: float = 0.07,
             ks: Sequence[int] = (1, 5, 10, 20, 50, 100), device: Optional[torch.device] = None) -> dict:
    """``val_top1`` at ``k``, plus the whole ``curve`` of accuracy over ``ks`` (for the plot; the ks above the
    training set's size are left out)."""
    check_k(k, len(train))
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    curve = {}
    for kk in sorted(set(ks) | {k}):
        if kk <= len(train):
            curve[kk] = _accuracy(knn_predict(train, val.features, num_classes, kk, temperature, device=device),
                                  val.labels)
    return {"val_top1": curve[k], "k": k, "temperature": temperature,
            "curve": {"k": list(curve), "val_top1": list(curve.values())}}


# ----- few-shot -------------------------------------------------------------------------------------------------
RIDGE_REG = 1e-3  # the few-shot ridge's lambda: one default for the function, the options and --ridge-reg
def ridge_fit(x: torch.Tensor, targets: torch.Tensor, reg: float) -> torch.Tensor:
    """Closed-form ridge regression ``argmin_W |[x 1] W - targets|^2 + reg |W|^2`` (float64).

    Solved in the primal (d+1 unknowns) when there are more samples than features, else in the dual
    (``W = X^T (X X^T + reg I)^-1 Y``): the two are equal, the smaller system is cheaper and better conditioned."""
    x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y = targets.double()
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + reg * torch.eye(d, dtype=x.dtype), x.T @ y)
    return x.T @ torch.linalg.solve(x @ x.T + reg * torch.eye(n, dtype=x.dtype), y)


def ridge_predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return x @ w


def sample_shots(labels: torch.Tensor, shots: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` random samples per class (seeded); an error if a class has fewer."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < shots:
            raise ValueError(f"few-shot: class {c} has {len(idx)} training samples, fewer than {shots} shots")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked)


def fewshot_eval(train: FeatureSet, val: FeatureSet, num_classes: int, *, shots: Sequence[int] = (1, 5, 10, 25),
                 seeds: int = 5, reg: float = RIDGE_REG) -> dict:
    """Few-shot linear evaluation: for each shot count and seed, fit ridge regression (targets +1 for the class,
    -1 otherwise, as big_vision's few-shot evaluator) on ``shots`` L2-normalised training features per class,
    then classify the whole validation split by the largest output. Reports mean and sample std over the ``seeds``
    draws (n = ``seeds``)."""
    if seeds < 1:
        raise ValueError(f"few-shot seeds (--fewshot-seeds) must be >= 1, got {seeds}")
    if any(s < 1 for s in shots):
        raise ValueError(f"shots must be >= 1, got {list(shots)}")
    x_train = F.normalize(train.features.double(), dim=1)
    x_val = F.normalize(val.features.double(), dim=1)
    results = {}
    for n in sorted(set(shots)):
        accs = []
        for seed in range(seeds):
            idx = sample_shots(train.labels, n, num_classes, seed)
            targets = 2.0 * F.one_hot(train.labels[idx], num_classes).double() - 1.0
            w = ridge_fit(x_train[idx], targets, reg)
            accs.append(_accuracy(ridge_predict(w, x_val), val.labels))
        results[n] = {**mean_std(accs), "per_seed": accs}  # sample std over the n = seeds draws
    return {"shots": list(results), "mean": [r["mean"] for r in results.values()],
            "std": [r["std"] for r in results.values()], "per_seed": [r["per_seed"] for r in results.values()],
            "seeds": seeds, "reg": reg}
