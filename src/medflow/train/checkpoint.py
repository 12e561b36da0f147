"""Resumable training state: progress (epochs, early stopping, curves), generator states, checkpoints.

A checkpoint is written atomically after every epoch by rank 0 and holds every rank's generator
states, so a resumed job reaches bitwise the same weights on CPU. It is resumed only by the job
whose identity it records (`checkpoint_identity`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import config as config_mod
from ..core import fsio
from .dist import Dist
from .inputs import FoldJob

CHECKPOINT_FORMAT = "medflow-checkpoint/1"
CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_s")


@dataclass
class Progress:
    """What survives a restart besides weights and optimiser: epochs done, early stopping, curves."""

    epochs_done: int = 0
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False
    curves: list[dict[str, Any]] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    patches_seen: int = 0
    train_s: float = 0.0

    def observe(self, epoch: int, val_loss: float | None, patience: int) -> bool:
        """Record an epoch; True when it is the new best (lowest validation loss)."""
        self.epochs_done = epoch + 1
        if val_loss is None:
            self.best_epoch = epoch
            return True
        if self.best_loss is None or val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        if patience and self.bad_epochs >= patience:
            self.stopped = True
        return False


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy tuple form
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_identity(job: FoldJob) -> dict[str, Any]:
    """A checkpoint is resumed only by the same job on the same data: the same config sections, fold,
    patients and shard contents (``data``: the digest of every shard of its patients)."""
    patients = {"train": sorted(job.patients["train"]), "val": sorted(job.patients["val"])}
    return {
        "study": job.study,
        "outer": job.outer,
        "inner": job.inner,
        "config_hash": job.config_hash,
        "epochs": int(job.train_cfg["epochs"]),  # a refit's comes from its selection, not the config
        "patients": hashlib.sha256(config_mod.canonical_json(patients).encode()).hexdigest()[:16],
        "data": job.data_digest,
    }


_IDENTITY_WORDS = {
    "config_hash": "config",
    "epochs": "epoch count",
    "patients": "patients of the fold",
    "data": "shard contents (data)",
    "stain": "stain reference",
}


def load_checkpoint(path: Path, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(checkpoint to resume from, None), or (None, why it is not resumed) when one exists but is
    unreadable or belongs to another job or other data; (None, None) when there is none."""
    if not path.exists():
        return None, None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn file cannot happen (atomic writes), a foreign one can
        return None, f"unreadable ({type(exc).__name__})"
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        return None, "not a medflow checkpoint"
    old = ckpt.get("identity") or {}
    changed = [key for key in identity if old.get(key) != identity[key]]
    if changed:
        return None, "made from other " + ", ".join(_IDENTITY_WORDS.get(k, k) for k in changed)
    return ckpt, None


def save_checkpoint(
    job: FoldJob,
    d: Dist,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    progress: Progress,
    best_state: dict | None,
    identity: dict,
) -> None:
    states = d.allgather_object(rng_state())  # every rank's generators: dropout etc. differ by rank
    if not d.is_root:
        return
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "world_size": d.size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "lr_at(epoch)", "epochs_done": progress.epochs_done},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": asdict(progress),
        "best_state": best_state,
        "rng": states,
    }
    with fsio.atomic_path(job.out_dir / "checkpoint.pt") as tmp:
        torch.save(ckpt, tmp)


def curves_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_COLUMNS})
    return buf.getvalue()
