"""The inner optimizers and LR schedules: the paper's rules (linear LR scaling, per-step warm-up,
step decays; SGD with Nesterov momentum and weight decay that spares BatchNorm parameters) and the
transformer recipe (AdamW without weight decay on norms, biases and embeddings; warm-up and a cosine
decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

ADAMW_BETAS = (0.9, 0.95)  # adamw's (beta1, beta2) unless betas is set
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


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


def cosine_lr_at(epoch: float, peak: float, warmup_epochs: float, total_epochs: float, final: float) -> float:
    """The LR at a fractional epoch: linear warm-up from 0 to ``peak``, then a cosine from ``peak``
    to ``final`` at ``total_epochs``."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1e-12))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW whose weight decay skips norms' parameters, biases and embeddings (a tied output layer
    shares its embedding's tensor, so it is spared too)."""
    spared = {
        id(p)
        for m in model.modules()
        if isinstance(m, (*NORMS, nn.Embedding))
        for p in m.parameters(recurse=False)
    }
    spared |= {id(p) for name, p in model.named_parameters() if name.endswith("bias") or "bias_" in name}
    params = list(model.parameters())  # each tensor once, tied ones included
    groups = [
        {"params": [p for p in params if id(p) not in spared], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in spared], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
