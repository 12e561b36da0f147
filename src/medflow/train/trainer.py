"""One epoch of data-parallel training (`Trainer`) and the epoch-end BatchNorm recalibration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import models
from .dist import Dist
from .loader import EpochLoader
from .optim import lr_at


@dataclass
class Trainer:
    model: nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    d: Dist
    train_cfg: dict
    peak_lr: float
    base_lr: float
    scaler: Any = None  # torch.amp.GradScaler on CUDA with AMP
    # Called after every step with (patches, mean loss, correct, lr) of this rank's batch (tracking, progress).
    on_step: Callable[[int, float, float, float], None] | None = None

    @property
    def amp(self) -> bool:
        return self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()  # set_to_none by default; Horovod takes no argument
        if not self.amp:
            loss.backward()
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if self.d.backend == "horovod":  # Horovod's documented AMP recipe
            hvd_optimizer: Any = self.optimizer  # a horovod.torch.DistributedOptimizer
            hvd_optimizer.synchronize()
            self.scaler.unscale_(self.optimizer)
            with hvd_optimizer.skip_synchronize():
                self.scaler.step(self.optimizer)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_epoch(self, loader: EpochLoader, epoch: int) -> dict[str, float]:
        """One pass over this rank's batches; returns globally averaged loss/accuracy."""
        self.model.train()
        n_batches = max(len(loader), 1)
        totals = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, n
        lr = self.base_lr
        for b, (x, y) in enumerate(loader):
            lr = lr_at(epoch + b / n_batches, self.train_cfg, self.peak_lr, self.base_lr)
            self.set_lr(lr)
            x, y = x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)
            with self.autocast():
                out = self.model(x)
                loss = models.loss_of(out, y, self.criterion)
            self.step(loss)
            logits = models.logits_of(out).detach()
            loss_v, correct = float(loss.detach()), float((logits.argmax(1) == y).sum())
            totals += torch.tensor([loss_v * len(y), correct, len(y)], dtype=torch.float64)
            if self.on_step is not None:
                self.on_step(len(y), loss_v, correct, lr)
        loss_n, correct, n = self.d.allreduce_sum(totals).tolist()
        return {"loss": loss_n / max(n, 1), "acc": correct / max(n, 1), "patches": int(n), "lr": lr}


# ---- BatchNorm statistics ---------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: EpochLoader, d: Dist, max_patches: int, amp: bool = False) -> int:
    """Re-estimate the running statistics of every trainable BatchNorm layer ("precise BN").

    With momentum 0.1 the running statistics of a short run still mostly hold their initial values
    (measured on the demo: val accuracy 0.5 in eval mode, 1.0 with batch statistics). Here they are
    recomputed as the exact average over up to ``max_patches`` training patches of this epoch's
    plan, split across ranks, and averaged over ranks. Returns the patches used on this rank.
    """
    net = models.unwrap(model)
    net.train()
    layers = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    if not layers or max_patches <= 0 or len(loader) == 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    per_rank = -(-max_patches // d.size)
    used = 0
    try:
        for b in range(len(loader)):
            if used >= per_rank:
                break
            x, _ = loader.batch(b)
            with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
                net(torch.from_numpy(x).to(d.device, non_blocking=True))
            used += len(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    if d.size > 1:
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                assert buf is not None  # track_running_stats layers only
                buf.copy_((d.allreduce_sum(buf.detach().cpu()) / d.size).view_as(buf).to(buf.dtype))
    return used
