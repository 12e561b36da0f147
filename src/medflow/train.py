"""`medflow train`: one (outer, inner) fold of the nested cross-validation, data-parallel.

Launched as N ranks (``mpiexec -n N`` / ``srun``) by the Snakemake rule; Horovod or DDP from
``launch.backend`` (see ``medflow.dist``). Each rank trains on its share of every epoch's batches
(``medflow.data.make_loader``); gradients are averaged across ranks. Validation is sharded too:
each rank predicts a contiguous slice of the validation set and the predictions are gathered
(allgather) so every rank computes the metrics over the whole set.

Outputs in ``--out-dir`` (rank 0): ``checkpoint.pt`` after every epoch (atomic), ``curves.csv``,
``model.pt`` (weights of the best validation-loss epoch, or the last epoch without validation)
and ``record.json`` last, so a directory with a record is a finished job. A rerun (SLURM requeue,
restart after a kill) resumes from ``checkpoint.pt`` and on CPU reaches bitwise the same weights.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import config as config_mod
from . import dist as dist_mod
from . import fsio, models, provenance
from .errors import InputError
from .records import JobRecord

CHECKPOINT_FORMAT = "medflow-checkpoint/1"
CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_s")
# Test hook: SIGKILL rank 0 right after this epoch's checkpoint (a real kill at a known point).
KILL_AFTER_EPOCH_ENV = "MEDFLOW_KILL_AFTER_EPOCH"


# ---- the job's inputs ------------------------------------------------------------------------------
@dataclass
class FoldJob:
    """Everything one training job reads, resolved and checked before anything is written."""

    cfg: dict
    study: str
    study_cfg: dict
    index: dict
    plan: dict
    outer: int
    inner: int | None
    patients: dict[str, list[str]]
    out_dir: Path

    @property
    def train_cfg(self) -> dict:
        return self.study_cfg["train"]

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def derive(self, *ids: Any) -> int:
        from .config import derive_seed
        return derive_seed(self.seed, self.study, self.outer, "refit" if self.inner is None else self.inner, *ids)

    @property
    def config_hash(self) -> str:
        return config_mod.section_hash(self.cfg, *record_sections(self.study))


def record_sections(study: str) -> tuple[str, ...]:
    return (f"studies.{study}", "launch", "folds")


def study_config(cfg: dict, study: str, source: str | Path) -> dict:
    if study not in cfg.get("studies", {}):
        raise InputError(source, f"study {study!r} is not in the config (studies: {sorted(cfg.get('studies', {}))})")
    return cfg["studies"][study]


def load_fold_job(config_path: str, study: str, index_path: str, folds_path: str, outer: int,
                  inner: int | None, out_dir: str) -> FoldJob:
    from .shards import load_index
    from .splits import fold_patients, load_plan

    cfg = config_mod.load(config_path)
    study_cfg = study_config(cfg, study, config_path)
    index = load_index(index_path)
    plan = load_plan(folds_path)
    if index["cohort"] != study_cfg["cohort"]:
        raise InputError(index_path, f"index is cohort {index['cohort']!r}, study {study!r} uses {study_cfg['cohort']!r}")
    if plan.get("cohort") != index["cohort"] or plan.get("study") not in (None, study):
        raise InputError(folds_path, f"fold plan is for study {plan.get('study')!r} / cohort {plan.get('cohort')!r}")
    try:
        patients = fold_patients(plan, outer, inner)
    except InputError as exc:
        raise InputError(folds_path, exc.problem) from None
    if not patients["train"]:
        raise InputError(folds_path, f"outer {outer} inner {inner}: no training patients")
    return FoldJob(cfg, study, study_cfg, index, plan, outer, inner, patients, Path(out_dir))


# ---- learning rate -----------------------------------------------------------------------------------
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


# ---- early stopping and resumable state ------------------------------------------------------------
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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_identity(job: FoldJob) -> dict[str, Any]:
    """A checkpoint is resumed only by the same job: same config sections, fold and patients."""
    from .config import derive_seed
    return {"study": job.study, "outer": job.outer, "inner": job.inner, "config_hash": job.config_hash,
            "patients": derive_seed(0, *sorted(job.patients["train"]), "|", *sorted(job.patients["val"]))}


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (absent, unreadable or from a different job)."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn file cannot happen (atomic writes), a foreign one can
        print(f"medflow train: ignoring unreadable checkpoint {path} ({type(exc).__name__})", flush=True)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("identity") != identity:
        print(f"medflow train: ignoring checkpoint {path} of a different job/config", flush=True)
        return None
    return ckpt


# ---- one epoch -------------------------------------------------------------------------------------
@dataclass
class Trainer:
    model: nn.Module           # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    d: dist_mod.Dist
    train_cfg: dict
    peak_lr: float
    base_lr: float
    scaler: Any = None         # torch.amp.GradScaler on CUDA with AMP

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
            self.optimizer.synchronize()
            self.scaler.unscale_(self.optimizer)
            with self.optimizer.skip_synchronize():
                self.scaler.step(self.optimizer)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_epoch(self, loader, epoch: int) -> dict[str, float]:
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
            totals += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                   dtype=torch.float64)
        loss_n, correct, n = self.d.allreduce_sum(totals).tolist()
        return {"loss": loss_n / max(n, 1), "acc": correct / max(n, 1), "patches": int(n), "lr": lr}


# ---- BatchNorm statistics ---------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, d: dist_mod.Dist, max_patches: int, amp: bool = False) -> int:
    """Re-estimate the running statistics of every trainable BatchNorm layer ("precise BN").

    With momentum 0.1 the running statistics of a short run still mostly hold their initial values
    (measured on the demo: val accuracy 0.5 in eval mode, 1.0 with batch statistics). Here they are
    recomputed as the exact average over up to ``max_patches`` training patches of this epoch's
    plan, split across ranks, and averaged over ranks. Returns the patches used on this rank.
    """
    net = models.unwrap(model)
    net.train()
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
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
                buf.copy_((d.allreduce_sum(buf.detach().cpu()) / d.size).view_as(buf).to(buf.dtype))
    return used


# ---- evaluation over a whole set, sharded across ranks ---------------------------------------------
def rank_slice(n: int, rank: int, size: int) -> np.ndarray:
    """Contiguous, disjoint, covering positions of rank ``rank`` (no padding: no duplicates)."""
    return np.arange(n * rank // size, n * (rank + 1) // size, dtype=np.int64)


@torch.no_grad()
def predict_set(model: nn.Module, pset, d: dist_mod.Dist, batch_size: int, amp: bool = False,
                gather: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(y_true, y_prob, load_s) of the whole set in set order: each rank predicts its slice and the
    slices are gathered to every rank. ``model`` is the unwrapped network (DDP's forward would wait
    for the other ranks, whose slices may have a different number of batches)."""
    net = models.unwrap(model).eval()
    idx = rank_slice(len(pset), d.rank, d.size) if gather else np.arange(len(pset))
    probs = np.zeros((0, len(pset.class_names)), dtype=np.float32)
    parts, load_s = [], 0.0
    t0 = time.perf_counter()
    for _, x in pset.iter_batches(batch_size, idx):
        load_s += time.perf_counter() - t0
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(d.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            parts.append(models.predict_proba(net, xt).cpu().numpy())
        t0 = time.perf_counter()
    if parts:
        probs = np.concatenate(parts)
    if gather and d.size > 1:
        gathered = d.allgather_object((probs, load_s))
        probs = np.concatenate([g[0] for g in gathered])
        load_s = sum(g[1] for g in gathered) / d.size
    return pset.labels.copy(), probs, load_s


def nll(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """Mean cross-entropy of predicted probabilities (the validation loss)."""
    if not len(y_true):
        return None
    p = np.clip(y_prob[np.arange(len(y_true)), y_true].astype(np.float64), 1e-12, 1.0)
    return float(-np.log(p).mean())


def accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    return float((y_prob.argmax(1) == y_true).mean()) if len(y_true) else None


# ---- outputs -----------------------------------------------------------------------------------------
def curves_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_COLUMNS})
    return buf.getvalue()


def model_meta(job: FoldJob, pset_train, progress: Progress) -> dict[str, Any]:
    return {"class_names": pset_train.class_names, "kind": job.index["kind"], "study": job.study,
            "cohort": job.index["cohort"], "outer": job.outer, "inner": job.inner,
            "positive_class": job.study_cfg["positive_class"], "epochs_run": progress.epochs_done,
            "best_epoch": progress.best_epoch, "seed": job.seed, "config_hash": job.config_hash,
            "dtype": str(pset_train.dtype)}


def clear_final_outputs(out_dir: Path) -> None:
    """A rerun first removes the previous run's final outputs: only a finished job has a record."""
    for name in ("record.json", "model.pt"):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


# ---- the job -----------------------------------------------------------------------------------------
def train_fold(job: FoldJob, d: dist_mod.Dist, record: JobRecord) -> JobRecord:
    from .data import PatchSet, make_loader

    tc = job.train_cfg
    with record.timed("prepare_train"):
        train_set = PatchSet(job.index, job.patients["train"], tc["max_patches"], job.derive("train-set"))
        per_rank = -(-len(train_set) // d.size)
        loader = make_loader(train_set, batch_size=tc["batch_size"], rank=d.rank, world_size=d.size,
                             shuffle=True, seed=job.derive("loader"), augment=tc["augment"],
                             balance=tc["balance"], sampling=tc["sampling"],
                             drop_last=per_rank >= tc["batch_size"], workers=tc["workers"])
        torch.manual_seed(job.derive("init"))
        in_channels, patch_size = train_set.patch_shape[-1], train_set.patch_shape[0]
        try:
            model = models.build(job.study_cfg["model"], len(train_set.class_names), in_channels, patch_size)
        except InputError as exc:
            raise InputError(job.out_dir, exc.problem) from None
        on_cuda = d.device.type == "cuda"
        model = model.to(d.device)
        if on_cuda and tc["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        base_lr = float(tc["lr"])
        peak_lr = scaled_lr(base_lr, d.size, tc["lr_scaling"])
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InputError(job.out_dir, "model.trainable_layers = 0 leaves nothing to train")
        # Wrap before loading state: Horovod's DistributedOptimizer re-creates the optimiser from
        # its param_groups, dropping any state loaded into the original.
        optimizer = d.wrap_optimizer(make_optimizer(params, tc, peak_lr), model)
        scaler = torch.amp.GradScaler("cuda") if on_cuda and tc["amp"] else None
        progress, best_state = Progress(), None
        identity = checkpoint_identity(job)
        ckpt = load_checkpoint(job.out_dir / "checkpoint.pt", identity)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            progress = Progress(**ckpt["progress"])
            best_state = ckpt.get("best_state")
            states = ckpt["rng"]
            set_rng_state(states[d.rank] if d.rank < len(states) else states[0])
            record["resumed_from_epoch"] = progress.epochs_done
        wrapped = d.wrap_model(model)
        d.broadcast_state(model, optimizer)
        trainer = Trainer(wrapped, optimizer, nn.CrossEntropyLoss(), d, tc, peak_lr, base_lr, scaler)
    with record.timed("prepare_test"):
        val_set = PatchSet(job.index, job.patients["val"], tc["max_patches"], job.derive("val-set")) \
            if job.patients["val"] else None

    eval_batch = max(2 * int(tc["batch_size"]), 64)
    kill_after = os.environ.get(KILL_AFTER_EPOCH_ENV)
    val_load_s = 0.0
    with record.timed("train"):
        for epoch in range(progress.epochs_done, int(tc["epochs"])):
            if progress.stopped:
                break
            t0 = time.perf_counter()
            loader.set_epoch(epoch)
            stats = trainer.train_epoch(loader, epoch)
            recalibrate_batchnorm(model, loader, d, int(tc["bn_recalibration"]), amp=trainer.amp)
            train_s = time.perf_counter() - t0
            d.sync_buffers(model)  # batch counters and any other buffer: rank 0's everywhere
            val_loss = val_acc = None
            if val_set is not None:
                y_true, y_prob, load_s = predict_set(model, val_set, d, eval_batch, amp=trainer.amp)
                val_loss, val_acc, val_load_s = nll(y_true, y_prob), accuracy(y_true, y_prob), val_load_s + load_s
            # Every rank holds the same gathered val loss; rank 0's decision is broadcast anyway.
            is_best = progress.observe(epoch, val_loss, int(tc["early_stopping"]))
            progress.stopped = bool(d.broadcast_object(progress.stopped))
            if is_best:
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            epoch_s = time.perf_counter() - t0
            progress.epoch_s.append(epoch_s)
            progress.train_s += train_s
            progress.patches_seen += stats["patches"]
            progress.curves.append({"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["acc"],
                                    "val_loss": val_loss, "val_acc": val_acc, "lr": stats["lr"],
                                    "epoch_s": round(epoch_s, 4)})
            save_checkpoint(job, d, model, optimizer, scaler, progress, best_state, identity)
            if d.is_root:
                print(f"[{job.study} o{job.outer} i{job.inner}] epoch {epoch}: loss {stats['loss']:.4f} "
                      f"acc {stats['acc']:.3f} val_loss {val_loss if val_loss is None else round(val_loss, 4)} "
                      f"val_acc {val_acc} ({epoch_s:.2f}s)", flush=True)
                if kill_after is not None and int(kill_after) == epoch:
                    os.kill(os.getpid(), signal.SIGKILL)

    # The exported model: the best validation-loss epoch (the last one without validation).
    if best_state is not None:
        model.load_state_dict(best_state)
    digests = d.allgather_object(dist_mod.param_digest(model))
    record["replicas"] = {"state_sha256": digests, "identical": len(set(digests)) == 1}
    if val_set is not None:
        with record.timed("predict"):
            y_true, y_prob, _ = predict_set(model, val_set, d, eval_batch, amp=trainer.amp)
    load_ms = _load_ms_per_patch(d, loader)
    if d.is_root:
        fill_record(record, job, d, train_set, val_set, progress, load_ms,
                    (y_true, y_prob) if val_set is not None else None)
        # Also here: a job resumed from a checkpoint that covers every epoch runs no epoch (and Snakemake
        # deleted the declared outputs before the rerun).
        fsio.write_text(job.out_dir / "curves.csv", curves_csv(progress.curves))
        models.save_model(job.out_dir / "model.pt", model, model_meta(job, train_set, progress))
    return record


def save_checkpoint(job: FoldJob, d: dist_mod.Dist, model: nn.Module, optimizer, scaler,
                    progress: Progress, best_state: dict | None, identity: dict) -> None:
    states = d.allgather_object(rng_state())  # every rank's generators: dropout etc. differ by rank
    if not d.is_root:
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "identity": identity, "world_size": d.size,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": "lr_at(epoch)", "epochs_done": progress.epochs_done},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "progress": asdict(progress), "best_state": best_state, "rng": states}
    with fsio.atomic_path(job.out_dir / "checkpoint.pt") as tmp:
        torch.save(ckpt, tmp)
    fsio.write_text(job.out_dir / "curves.csv", curves_csv(progress.curves))


def _load_ms_per_patch(d: dist_mod.Dist, loader) -> float | None:
    load_s, patches = d.allreduce_sum([loader.stats["load_s"], loader.stats["patches"]]).tolist()
    return 1000.0 * load_s / patches if patches else None


def fill_record(record: JobRecord, job: FoldJob, d: dist_mod.Dist, train_set, val_set,
                progress: Progress, load_ms: float | None, val_pred: tuple | None) -> None:
    from .metrics import classification_metrics

    last = progress.curves[-1] if progress.curves else {}
    epochs = progress.epoch_s
    record["timings_s"]["epochs"] = [round(s, 4) for s in epochs]
    record["throughput"].update({
        "load_ms_per_patch": load_ms,
        "train_img_per_s": progress.patches_seen / progress.train_s if progress.train_s else None,
        "s_per_epoch": float(np.mean(epochs)) if epochs else None,
    })
    metrics: dict[str, Any] = {"train": {"oacc": last.get("train_acc"), "loss": last.get("train_loss")}}
    if val_pred is not None:
        y_true, y_prob = val_pred
        val = classification_metrics(y_true, y_prob, train_set.class_names, job.study_cfg["positive_class"])
        val["loss"] = nll(y_true, y_prob)
        metrics["val"] = val
    record["metrics"] = metrics
    record["n_patches"] = {"train": len(train_set), "val": len(val_set) if val_set is not None else 0}
    record["patients"] = {"train": job.patients["train"], "val": job.patients["val"]}
    record["epochs_run"] = progress.epochs_done
    record["best_epoch"] = progress.best_epoch
    record["early_stopped"] = progress.stopped
    record["lr"] = {"base": float(job.train_cfg["lr"]), "peak": scaled_lr(float(job.train_cfg["lr"]), d.size,
                                                                          job.train_cfg["lr_scaling"])}
    record["eval"] = "val predictions sharded across ranks and gathered (allgather); metrics over the whole set"
    record["outputs"] = {"model": "model.pt", "checkpoint": "checkpoint.pt", "curves": "curves.csv"}


# ---- CLI -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", required=True, help="cohort index JSON")
    p.add_argument("--folds", required=True, help="fold plan JSON (medflow plan-folds)")
    p.add_argument("--outer", type=int, required=True)
    p.add_argument("--inner", type=int, default=None,
                   help="inner fold; omit to train on the whole outer training set (no validation)")
    p.add_argument("--out-dir", required=True)


@contextlib.contextmanager
def _dist_context(backend: str, threads: int) -> Iterator[dist_mod.Dist]:
    d = dist_mod.init(backend, threads)
    try:
        yield d
    finally:
        d.shutdown()


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    job = load_fold_job(args.config, args.study, args.index, args.folds, args.outer, args.inner, args.out_dir)
    launch = job.cfg["launch"]
    with _dist_context(launch["backend"], launch["threads_per_rank"]) as d:
        if d.is_root:
            job.out_dir.mkdir(parents=True, exist_ok=True)
            clear_final_outputs(job.out_dir)
        d.barrier()
        record = JobRecord("train", job.cfg, record_sections(job.study), study=job.study,
                           cohort=job.index["cohort"], kind=job.index["kind"],
                           model=job.study_cfg["model"]["name"], outer=job.outer, inner=job.inner)
        devices = [dev for part in d.allgather_object(d.devices) for dev in part]
        record["launch"] = provenance.launch_info(d.backend, d.size, devices)
        record["launch"]["backend_requested"] = launch["backend"]
        record["timings_s"]["load_args"] = time.perf_counter() - t0
        train_fold(job, d, record)
        if d.is_root:
            record.finish("ok").save(job.out_dir / "record.json")
            print(f"train {job.out_dir}: {record['epochs_run']} epochs, val "
                  f"{(record['metrics'].get('val') or {}).get('oacc')}", flush=True)
        d.barrier()
    return 0
