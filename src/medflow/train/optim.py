"""Learning rate and optimiser: LR scaled by world size, warm-up, schedules as pure functions of time."""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(base_lr: float, world_size: int, scaling: str) -> float:
    """Goyal et al.: the LR grows with the global batch (linear), or its square root."""
    if scaling == "linear":
        return base_lr * world_size
    if scaling == "sqrt":
        return base_lr * math.sqrt(world_size)
    return base_lr


def lr_at(t: float, train_cfg: dict, peak_lr: float, base_lr: float) -> float:
    """LR at fractional epoch ``t`` (0-based): linear warm-up from the one-rank LR to the scaled LR,
    then the schedule. A pure function of t, so a resumed job needs no scheduler object."""
    warmup = float(train_cfg["warmup_epochs"])
    if warmup > 0 and t < warmup:
        return base_lr + (peak_lr - base_lr) * t / warmup
    name, epochs = train_cfg["scheduler"], int(train_cfg["epochs"])
    after = t - warmup
    if name == "step":
        return peak_lr * float(train_cfg["gamma"]) ** int(after // int(train_cfg["step_size"]))
    if name == "cosine":
        span = max(epochs - warmup, 1e-9)
        return 0.5 * peak_lr * (1.0 + math.cos(math.pi * min(after / span, 1.0)))
    if name == "cosine_restarts":
        period = float(train_cfg["restart_epochs"])
        return 0.5 * peak_lr * (1.0 + math.cos(math.pi * (after % period) / period))
    return peak_lr


def make_optimizer(params: list[nn.Parameter], train_cfg: dict, lr: float) -> torch.optim.Optimizer:
    name, wd = train_cfg["optimizer"], float(train_cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(train_cfg["momentum"]), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)
