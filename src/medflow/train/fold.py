"""`medflow train`: one (outer, inner) fold of the nested cross-validation, data-parallel.

Launched as N ranks (``mpiexec -n N`` / ``srun``) by the Snakemake rule; Horovod or DDP from
``launch.backend`` (see `medflow.train.dist`). Each rank trains on its share of every epoch's batches
(`medflow.train.loader.EpochLoader`); gradients are averaged across ranks. Validation is sharded too:
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
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import fsio, provenance
from ..core import progress as progress_mod
from ..core.errors import InputError
from ..core.metrics import classification_metrics
from ..core.records import JobRecord
from . import dist as dist_mod
from . import models, tracking
from .checkpoint import Progress, checkpoint_identity, curves_csv, load_checkpoint, save_checkpoint, set_rng_state
from .evaluate import accuracy, nll, predict_set
from .inputs import FoldJob, load_fold_job, record_sections
from .loader import EpochLoader
from .optim import make_optimizer, scaled_lr
from .patchset import PatchSet
from .stain_setup import TrainingStain, for_training
from .trainer import Trainer, recalibrate_batchnorm


def model_meta(job: FoldJob, pset_train: PatchSet, progress: Progress) -> dict[str, Any]:
    # predict-wsi reads slides at the model's µm/px, whatever the config it runs with says
    scale = {"mpp": job.cfg["wsi"]["mpp"]} if job.index["kind"] == "wsi" else {}
    return {
        "class_names": pset_train.class_names,
        "kind": job.index["kind"],
        "study": job.study,
        "cohort": job.index["cohort"],
        "outer": job.outer,
        "inner": job.inner,
        "positive_class": job.study_cfg["positive_class"],
        "epochs_run": progress.epochs_done,
        "best_epoch": progress.best_epoch,
        "seed": job.seed,
        "config_hash": job.config_hash,
        "dtype": str(pset_train.dtype),
        "data_digest": job.data_digest,
        **scale,
    }


# ---- the job -----------------------------------------------------------------------------------------
def train_fold(job: FoldJob, d: dist_mod.Dist, record: JobRecord, stain: TrainingStain | None = None) -> JobRecord:
    tc = job.train_cfg
    stain = stain or TrainingStain(None, None, None)
    if stain.record is not None or stain.jitter is not None:
        record["stain"] = {**(stain.record or {}), "hed_jitter": stain.jitter}
    with record.timed("prepare_train"):
        train_set = PatchSet(job.index, job.patients["train"], tc["max_patches"], job.derive("train-set"))
        per_rank = -(-len(train_set) // d.size)
        loader = EpochLoader(
            train_set,
            batch_size=tc["batch_size"],
            rank=d.rank,
            world_size=d.size,
            shuffle=True,
            seed=job.derive("loader"),
            augment=tc["augment"],
            balance=tc["balance"],
            sampling=tc["sampling"],
            drop_last=per_rank >= tc["batch_size"],
            workers=tc["workers"],
            stain=stain.normaliser,
            jitter=stain.jitter,
        )
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
        if stain.identity is not None:  # a checkpoint of another stain reference is not resumed
            identity["stain"] = stain.identity
        ckpt, ignored = load_checkpoint(job.out_dir / "checkpoint.pt", identity)
        record["checkpoint"] = {"resumed_from_epoch": None, "ignored": ignored, "data_digest": job.data_digest}
        if ignored and d.is_root:
            print(
                f"medflow train: not resuming from {job.out_dir / 'checkpoint.pt'}: {ignored}; training from scratch",
                flush=True,
            )
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            progress = Progress(**ckpt["progress"])
            best_state = ckpt.get("best_state")
            states = ckpt["rng"]
            set_rng_state(states[d.rank] if d.rank < len(states) else states[0])
            record["resumed_from_epoch"] = record["checkpoint"]["resumed_from_epoch"] = progress.epochs_done
        wrapped = d.wrap_model(model)
        d.broadcast_state(model, optimizer)
    with record.timed("prepare_test"):
        val_set = (
            PatchSet(job.index, job.patients["val"], tc["max_patches"], job.derive("val-set"))
            if job.patients["val"]
            else None
        )
    with record.timed("prepare_train"):
        # Only now, with every shard of the job checked (the PatchSets above), does the job touch its run
        # directory: the tracker rewrites or removes earlier event files, which a failed job must leave as they are.
        tracker = tracking.start(job, d, progress, loader, identity)
        trainer = Trainer(
            wrapped, optimizer, nn.CrossEntropyLoss(), d, tc, peak_lr, base_lr, scaler, on_step=tracker.step
        )

    eval_batch = max(2 * int(tc["batch_size"]), 64)
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
            val_loss = val_acc = val_pred = None
            if val_set is not None:
                y_true, y_prob, load_s = predict_set(
                    model, val_set, d, eval_batch, amp=trainer.amp, transform=stain.transform
                )
                val_loss, val_acc, val_load_s = nll(y_true, y_prob), accuracy(y_true, y_prob), val_load_s + load_s
                val_pred = (y_true, y_prob)
            # Every rank holds the same gathered val loss; rank 0's decision is broadcast anyway.
            is_best = progress.observe(epoch, val_loss, int(tc["early_stopping"]))
            progress.stopped = bool(d.broadcast_object(progress.stopped))
            if is_best:
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            epoch_s = time.perf_counter() - t0
            progress.epoch_s.append(epoch_s)
            progress.train_s += train_s
            progress.patches_seen += int(stats["patches"])
            progress.curves.append(
                {
                    "epoch": epoch,
                    "train_loss": stats["loss"],
                    "train_acc": stats["acc"],
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": stats["lr"],
                    "epoch_s": round(epoch_s, 4),
                }
            )
            save_checkpoint(job, d, model, optimizer, scaler, progress, best_state, identity)
            tracker.epoch_end(progress, train_s, val_pred)
            if d.is_root:
                print(
                    f"[{job.study} o{job.outer} i{job.inner}] epoch {epoch}: loss {stats['loss']:.4f} "
                    f"acc {stats['acc']:.3f} val_loss {val_loss if val_loss is None else round(val_loss, 4)} "
                    f"val_acc {val_acc} ({epoch_s:.2f}s)",
                    flush=True,
                )

    # The exported model: the best validation-loss epoch (the last one without validation).
    if best_state is not None:
        model.load_state_dict(best_state)
    digests = d.allgather_object(dist_mod.param_digest(model))
    record["replicas"] = {"state_sha256": digests, "identical": len(set(digests)) == 1}
    if val_set is not None:
        with record.timed("predict"):
            y_true, y_prob, _ = predict_set(model, val_set, d, eval_batch, amp=trainer.amp, transform=stain.transform)
    load_ms = _load_ms_per_patch(d, loader)
    if d.is_root:
        fill_record(
            record, job, d, train_set, val_set, progress, load_ms, (y_true, y_prob) if val_set is not None else None
        )
        meta = model_meta(job, train_set, progress)
        if stain.record is not None:  # prediction applies the same normaliser (medflow.train.stain_setup)
            meta["stain"] = stain.record
        write_outputs(job, record, model, meta, progress)
    tracker.finish(record, job.out_dir / "model.pt")
    return record


def write_outputs(job: FoldJob, record: JobRecord, model: nn.Module, meta: dict, progress: Progress) -> None:
    """Replace the previous run's outputs only now that this one succeeded: model and curves first,
    the record (naming their digests) last, each atomically — a failed or killed job leaves the
    previous outputs as they were."""
    models.save_model(job.out_dir / "model.pt", model, meta)
    fsio.write_text(job.out_dir / "curves.csv", curves_csv(progress.curves))
    record["outputs"] = {
        name: {"path": name, "sha256": fsio.sha256_file(job.out_dir / name)} for name in ("model.pt", "curves.csv")
    }


def _load_ms_per_patch(d: dist_mod.Dist, loader: EpochLoader) -> float | None:
    load_s, patches = d.allreduce_sum([loader.stats["load_s"], loader.stats["patches"]]).tolist()
    return 1000.0 * load_s / patches if patches else None


def fill_record(
    record: JobRecord,
    job: FoldJob,
    d: dist_mod.Dist,
    train_set: PatchSet,
    val_set: PatchSet | None,
    progress: Progress,
    load_ms: float | None,
    val_pred: tuple | None,
) -> None:
    last = progress.curves[-1] if progress.curves else {}
    epochs = progress.epoch_s
    record["timings_s"]["epochs"] = [round(s, 4) for s in epochs]
    record["throughput"].update(
        {
            "load_ms_per_patch": load_ms,
            "train_img_per_s": progress.patches_seen / progress.train_s if progress.train_s else None,
            "s_per_epoch": float(np.mean(epochs)) if epochs else None,
        }
    )
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
    record["lr"] = {
        "base": float(job.train_cfg["lr"]),
        "peak": scaled_lr(float(job.train_cfg["lr"]), d.size, job.train_cfg["lr_scaling"]),
    }
    record["eval"] = "val predictions sharded across ranks and gathered (allgather); metrics over the whole set"
    record["inputs"] = job.inputs


# ---- CLI -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", required=True, help="cohort index JSON")
    p.add_argument("--folds", required=True, help="fold plan JSON (medflow plan-folds)")
    p.add_argument("--outer", type=int, required=True)
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        help="inner fold; omit to train on the whole outer training set (no validation)",
    )
    p.add_argument(
        "--selection",
        help="refit (no --inner): the `medflow select` record of this outer fold; trains the selected "
        "configuration on the whole outer training set for the selected model's number of epochs",
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--stain", default=None, help="the cohort's stain reference (medflow fit-stain) when wsi.stain is on"
    )
    progress_mod.add_quiet_argument(p)


@contextlib.contextmanager
def _dist_context(backend: str, threads: int) -> Iterator[dist_mod.Dist]:
    d = dist_mod.init(backend, threads)
    try:
        yield d
    finally:
        d.shutdown()


def refit_epochs(selection: str, study: str, outer: int) -> tuple[int, int]:
    """(selected inner fold, epochs to train) from the select record of this outer fold."""
    rec = fsio.read_json_document(selection, "select record")
    if rec.get("job") != "select" or rec.get("status") != "ok":
        raise InputError(
            selection, f"not a finished select record (job {rec.get('job')!r}, status {rec.get('status')!r})"
        )
    if rec.get("study") != study or rec.get("outer") != outer:
        raise InputError(
            selection,
            f"select record is study {rec.get('study')!r} outer {rec.get('outer')}, expected {study!r} outer {outer}",
        )
    epochs = rec.get("selected_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(selection, f"select record has no usable selected_epochs ({epochs!r})")
    return int(rec["selected_inner"]), epochs


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    refit = None
    if args.selection:
        if args.inner is not None:
            raise InputError(args.selection, "--selection (refit) trains on the whole outer training set: omit --inner")
        refit = refit_epochs(args.selection, args.study, args.outer)
    extra = {"selection": args.selection} if args.selection else None
    job = load_fold_job(args.config, args.study, args.index, args.folds, args.outer, args.inner, args.out_dir, extra)
    progress_mod.apply_quiet(job.cfg, args.quiet)
    if refit is not None:
        # The selected configuration, for as many epochs as produced the selected model; no validation set.
        job.study_cfg = {**job.study_cfg, "train": {**job.train_cfg, "epochs": refit[1], "early_stopping": 0}}
    stain = for_training(job, args.stain)
    launch = job.cfg["launch"]
    with _dist_context(launch["backend"], launch["threads_per_rank"]) as d:
        if d.is_root:
            job.out_dir.mkdir(parents=True, exist_ok=True)
        d.barrier()
        record = JobRecord(
            "train",
            job.cfg,
            record_sections(job.study),
            clock_start=t0,
            study=job.study,
            cohort=job.index["cohort"],
            kind=job.index["kind"],
            model=job.study_cfg["model"]["name"],
            outer=job.outer,
            inner=job.inner,
        )
        devices = [dev for part in d.allgather_object(d.devices) for dev in part]
        record["launch"] = provenance.launch_info(d.backend, d.size, devices)
        record["launch"]["backend_requested"] = launch["backend"]
        record["launch"].update(d.layout())  # nodes, hosts, ranks per node, per-rank host/local rank
        if refit is not None:
            record["refit"] = {
                "selection": os.path.relpath(args.selection, job.out_dir),
                "selected_inner": refit[0],
                "epochs": refit[1],
            }
        record["timings_s"]["load_args"] = time.perf_counter() - t0
        train_fold(job, d, record, stain)
        if d.is_root:
            record.finish("ok").save(job.out_dir / "record.json")
            print(
                f"train {job.out_dir}: {record['epochs_run']} epochs, val "
                f"{(record['metrics'].get('val') or {}).get('oacc')}",
                flush=True,
            )
        d.barrier()
    return 0
