"""What a training job reports while it runs (rank 0): TensorBoard events, MLflow runs and progress.

`start` is called once after the checkpoint is loaded; then `Tracker.step` after every optimisation step
(the Trainer's ``on_step``), `Tracker.epoch_end` after every epoch's checkpoint and `Tracker.finish` once
``model.pt`` is written. Ranks other than 0 get a `Tracker` that does nothing.

- TensorBoard: `medflow.train.tensorboard_log` (``tracking.tensorboard``, on by default);
- MLflow: `medflow.train.mlflow_runs` (``tracking.mlflow.uri``, off by default);
- progress: `medflow.core.progress` (``progress.mode``, ``progress.interval_s``, ``--quiet``), in
  optimisation steps over all epochs, with the epoch and its last losses as detail.

Tracking never fails a job: a sink that raises prints one warning line (``medflow train: warning: …``)
and is dropped. A job that dies (exception, SIGTERM) closes its event files and marks its MLflow run
FAILED on the way out (``atexit``). The record gets a ``tracking`` field naming what was written.
"""

from __future__ import annotations

import atexit
import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..core import config as config_mod
from ..core import progress as progress_mod
from ..core import provenance
from ..core.metrics import SCALAR_KEYS, classification_metrics
from ..core.records import JobRecord
from .checkpoint import Progress
from .dist import Dist
from .inputs import FoldJob
from .loader import EpochLoader
from .mlflow_runs import FoldRunSpec, MlflowLog, warn_line
from .tensorboard_log import CURVE_TAGS, EventLog, flat_params

warn = warn_line("train")


class Tracker:
    """The tracker of ranks other than 0 (and of jobs with everything off): does nothing."""

    def step(self, n: int, loss: float, correct: float, lr: float) -> None:
        """One optimisation step of ``n`` patches on this rank (mean loss, correct count, LR)."""

    def epoch_end(self, progress: Progress, train_s: float, val_pred: tuple[np.ndarray, np.ndarray] | None) -> None:
        """After the checkpoint of the epoch ``progress.curves[-1]`` (validation labels/probabilities)."""

    def finish(self, record: JobRecord, model_path: Path) -> None:
        """After ``model.pt``: final metrics, artefacts, ends the runs; adds ``record["tracking"]``."""


def fold_name(job: FoldJob) -> str:
    return "refit" if job.inner is None else f"inner{job.inner}"


def run_name(job: FoldJob) -> str:
    return f"{job.study}/outer{job.outer}/{fold_name(job)}"


def job_params(job: FoldJob, d: Dist) -> dict[str, Any]:
    """The flattened settings a run is compared by (TensorBoard hparams, MLflow params)."""
    cfg = job.cfg
    return flat_params(
        {
            "study": job.study,
            "cohort": job.index.get("cohort"),
            "outer": job.outer,
            "fold": fold_name(job),
            "seed": job.seed,
            "model": job.study_cfg["model"],
            "train": job.train_cfg,
            "launch": {**cfg["launch"], "world_size": d.size, "backend_used": d.backend},
            "folds": cfg["folds"],
        }
    )


def job_tags(job: FoldJob, d: Dist, site: str) -> dict[str, str]:
    launch = provenance.launch_info()
    return {
        "medflow.site": site,
        "medflow.study": job.study,
        "medflow.outer": str(job.outer),
        "medflow.fold": fold_name(job),
        "medflow.host": provenance.short_host(),
        "medflow.slurm_job_id": str(launch["slurm_job_id"] or ""),
        "medflow.launcher": launch["launcher"],
        "medflow.backend": d.backend,
        "medflow.ranks": str(d.size),
        "medflow.config_hash": job.config_hash,
        "medflow.run_dir": str(job.out_dir.resolve()),
        "mlflow.source.git.commit": str(provenance.software()["git"]),
        "mlflow.source.name": "medflow train",
        "mlflow.source.type": "JOB",
    }


def config_text(job: FoldJob, tags: Mapping[str, str]) -> str:
    """The TensorBoard ``config`` text: who ran what, then the config sections the job reads."""
    head = " · ".join(
        f"**{k.split('.')[-1]}** {v}"
        for k, v in tags.items()
        if k.startswith("medflow.") and k != "medflow.run_dir" and v
    )
    sections = {
        "seed": job.seed,
        "studies": {job.study: job.study_cfg},
        "launch": job.cfg["launch"],
        "folds": job.cfg["folds"],
    }
    body = yaml.safe_dump(sections, sort_keys=False)
    return head + "\n\n" + "\n".join("    " + line for line in body.splitlines())


def _identity(checkpoint: dict[str, Any]) -> str:
    return hashlib.sha256(config_mod.canonical_json(checkpoint).encode()).hexdigest()[:16]


def curve_values(row: Mapping[str, Any]) -> dict[str, float | None]:
    return {tag: row.get(col) for col, tag in CURVE_TAGS.items()}


class RootTracker(Tracker):
    """Rank 0's tracker (see the module docstring)."""

    def __init__(self, job: FoldJob, d: Dist, progress: Progress, loader: EpochLoader, identity: dict[str, Any]):
        cfg, self.job, self.world = job.cfg, job, d.size
        tcfg = cfg.get("tracking") or {}
        tb_cfg, ml_cfg = tcfg.get("tensorboard") or {}, tcfg.get("mlflow") or {}
        self.epochs, self.n_batches = int(job.train_cfg["epochs"]), max(len(loader), 1)
        self.loader, self.class_names = loader, list(loader.pset.class_names)
        self.step_every = int(tb_cfg.get("step_every", 10))
        self.seen = self._epoch_seen = int(progress.patches_seen)
        self._load = (float(loader.stats["load_s"]), float(loader.stats["patches"]))
        self._lr = 0.0
        self._reset_interval()
        self.reporter = progress_mod.reporter(
            cfg,
            f"train {run_name(job)}",
            self.epochs * self.n_batches,
            "steps",
            initial=min(progress.epochs_done, self.epochs) * self.n_batches,
        )
        self.reporter.note(f"epoch {min(progress.epochs_done + 1, self.epochs)}/{self.epochs}")
        site = provenance.site_name(cfg)
        tags, params = job_tags(job, d, site), job_params(job, d)
        restored = [(int(row["epoch"]), curve_values(row)) for row in progress.curves]
        self.tb: EventLog | None = None
        if tb_cfg.get("enabled", True):
            try:
                self.tb = EventLog(
                    job.out_dir,
                    flush_s=float(tb_cfg.get("flush_s", 15.0)),
                    epochs_done=progress.epochs_done,
                    patches_seen=progress.patches_seen,
                    curves=progress.curves,
                    config_text=config_text(job, tags),
                    hparams=params,
                )
            except Exception as exc:
                warn(f"TensorBoard logging failed ({type(exc).__name__}: {exc}); the job goes on without it")
        self.mlflow: MlflowLog | None = None
        if ml_cfg.get("uri"):
            spec = FoldRunSpec(
                uri=ml_cfg["uri"],
                experiment=ml_cfg.get("experiment") or cfg.get("study_name") or "medflow",
                site=site,
                study=job.study,
                outer=job.outer,
                fold=fold_name(job),
                identity=_identity(identity),
                resumed=progress.epochs_done > 0,
                params=params,
                tags=tags,
            )
            self.mlflow = MlflowLog(spec, timeout_s=float(ml_cfg.get("timeout_s", 60.0)), backfill=restored, warn=warn)
        self.log_model = bool(ml_cfg.get("log_model", True))
        atexit.register(self._abort)

    # ---- sinks ----
    def _guard(self, sink: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:
            warn(f"{sink} logging failed ({type(exc).__name__}: {exc}); the job goes on without it")
            if sink == "TensorBoard":
                tb, self.tb = self.tb, None
                if tb is not None:
                    try:
                        tb.close()
                    except Exception:  # already broken; it was reported once
                        pass

    def _scalars(self, values: Mapping[str, float | None], step: int) -> None:
        tb = self.tb
        if tb is not None:
            self._guard("TensorBoard", lambda: tb.scalars(values, step))

    def _reset_interval(self) -> None:
        self._steps, self._loss, self._correct, self._n, self._t0 = 0, 0.0, 0.0, 0, time.perf_counter()

    def _flush_interval(self, lr: float) -> None:
        if self._steps and self._n:
            dt = time.perf_counter() - self._t0
            values = {
                "batch/loss": self._loss / self._n,
                "batch/acc": self._correct / self._n,
                "batch/lr": lr,
                "batch/img_per_s": self._n * self.world / dt if dt > 0 else None,
            }
            self._scalars(values, self.seen)
        self._reset_interval()

    # ---- events ----
    def step(self, n: int, loss: float, correct: float, lr: float) -> None:
        self.reporter.advance(1)
        self.seen += n * self.world  # every rank runs equal batches; exact again at the epoch end
        if self.tb is None:
            return
        self._steps += 1
        self._loss += loss * n
        self._correct += correct
        self._n += n
        self._lr = lr
        if self._steps >= self.step_every:
            self._flush_interval(lr)

    def epoch_end(self, progress: Progress, train_s: float, val_pred: tuple[np.ndarray, np.ndarray] | None) -> None:
        row = progress.curves[-1]
        epoch = int(row["epoch"])
        if self._steps:
            self._flush_interval(self._lr)
        patches, self.seen = progress.patches_seen - self._epoch_seen, int(progress.patches_seen)
        self._epoch_seen = self.seen
        load_s, loaded = float(self.loader.stats["load_s"]), float(self.loader.stats["patches"])
        values = curve_values(row)
        values["perf/img_per_s"] = patches / train_s if train_s > 0 else None
        values["perf/load_ms_per_patch"] = (
            1000.0 * (load_s - self._load[0]) / (loaded - self._load[1]) if loaded > self._load[1] else None
        )
        self._load = (load_s, loaded)
        if val_pred is not None and len(val_pred[0]):
            val = classification_metrics(
                val_pred[0], val_pred[1], self.class_names, self.job.study_cfg.get("positive_class")
            )
            values.update({f"val/{k}": val[k] for k in SCALAR_KEYS if k != "oacc"})
        self._scalars(values, epoch)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, epoch)
        detail = f"epoch {min(epoch + 2, self.epochs)}/{self.epochs}, last loss {row['train_loss']:.4g}"
        if row.get("val_acc") is not None:
            detail += f" val_acc {row['val_acc']:.3f}"
        self.reporter.note(detail)
        self._reset_interval()  # batch/img_per_s leaves validation and checkpoint time out

    def finish(self, record: JobRecord, model_path: Path) -> None:
        atexit.unregister(self._abort)
        val = (record.get("metrics") or {}).get("val") or {}
        final: dict[str, float | None] = {f"model/val_{k}": val.get(k) for k in (*SCALAR_KEYS, "loss")}
        final["model/best_epoch"] = record.get("best_epoch")
        last = max(int(record.get("epochs_run") or 0) - 1, 0)
        tb = self.tb
        if tb is not None:
            self._guard("TensorBoard", lambda: tb.finish(final, last))
        info: dict[str, Any] = {"tensorboard": tb is not None, "mlflow": None}
        self.reporter.close()
        if self.mlflow is not None:
            throughput = record.get("throughput") or {}
            final["perf/train_img_per_s"] = throughput.get("train_img_per_s")
            final["perf/load_ms_per_patch_all_ranks"] = throughput.get("load_ms_per_patch")
            artefacts = [model_path, model_path.with_name("curves.csv")] if self.log_model else []
            info["mlflow"] = self.mlflow.finish(final, last, artefacts)
        record["tracking"] = info

    def _abort(self) -> None:
        """atexit: the job is dying before `finish` (or tracking itself failed)."""
        atexit.unregister(self._abort)
        if self.tb is not None:
            self._guard("TensorBoard", self.tb.close)
        if self.mlflow is not None:
            self.mlflow.abort("FAILED")


class Guarded(Tracker):
    """Forwards to rank 0's tracker; an unexpected error prints one warning and ends tracking for the
    rest of the job, which goes on (tracking never fails a job)."""

    def __init__(self, inner: RootTracker):
        self.inner: RootTracker | None = inner

    def _failed(self, exc: Exception) -> None:
        warn(f"tracking failed ({type(exc).__name__}: {exc}); the job goes on without it")
        inner, self.inner = self.inner, None
        if inner is not None:
            try:
                inner._abort()
            except Exception:  # already reported once
                pass

    def step(self, n: int, loss: float, correct: float, lr: float) -> None:
        if self.inner is not None:
            try:
                self.inner.step(n, loss, correct, lr)
            except Exception as exc:
                self._failed(exc)

    def epoch_end(self, progress: Progress, train_s: float, val_pred: tuple[np.ndarray, np.ndarray] | None) -> None:
        if self.inner is not None:
            try:
                self.inner.epoch_end(progress, train_s, val_pred)
            except Exception as exc:
                self._failed(exc)

    def finish(self, record: JobRecord, model_path: Path) -> None:
        record["tracking"] = {"tensorboard": False, "mlflow": None}
        if self.inner is not None:
            try:
                self.inner.finish(record, model_path)
            except Exception as exc:
                self._failed(exc)


def start(job: FoldJob, d: Dist, progress: Progress, loader: EpochLoader, identity: dict[str, Any]) -> Tracker:
    """Rank 0's tracker; a do-nothing one elsewhere (and where tracking cannot start). ``identity`` is the
    checkpoint's: the MLflow run a resumed job continues is the one of the same identity."""
    if not d.is_root:
        return Tracker()
    try:
        return Guarded(RootTracker(job, d, progress, loader, identity))
    except Exception as exc:
        warn(f"tracking could not start ({type(exc).__name__}: {exc}); the job goes on without it")
        return Tracker()
