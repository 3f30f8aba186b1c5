"""The paper's optimisation rules: linear LR scaling with per-step warm-up and step decays, and SGD
with Nesterov momentum and weight decay that spares BatchNorm parameters."""

from __future__ import annotations

import torch
from torch import nn


def peak_lr(lr_per_64: float, local_batch_size: int, workers: int) -> float:
    """Linear scaling: lr_per_64 * B_loc/64 per worker, times K."""
    return lr_per_64 * local_batch_size / 64 * workers


def lr_at(
    epoch: float,
    peak: float,
    warmup_start: float,
    warmup_epochs: float,
    decay_epochs: list[float],
    decay_factor: float,
) -> float:
    """The LR at a fractional epoch: linear warm-up from ``warmup_start`` to ``peak``, then
    ``peak`` times ``decay_factor`` for every decay epoch reached."""
    if epoch < warmup_epochs:
        return warmup_start + (peak - warmup_start) * epoch / warmup_epochs
    return peak * decay_factor ** sum(epoch >= d for d in decay_epochs)


def sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    """SGD whose weight decay skips BatchNorm weights and biases (by module type, so shortcut and
    transition BatchNorms are spared too)."""
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    bn = {id(p) for m in model.modules() if isinstance(m, bn_types) for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if id(p) not in bn]
    no_decay = [p for p in model.parameters() if id(p) in bn]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
