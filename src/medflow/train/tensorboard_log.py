"""TensorBoard event files of one training job (rank 0), written into its run directory.

``tensorboard --logdir results/<site>/runs`` shows every fold of every study side by side, each run
named by its directory, ``<study>/outer<i>/inner<j>``.

Series (tags):
- per epoch, step = epoch (as in ``curves.csv``): ``train/loss``, ``train/acc``, ``train/lr``,
  ``val/loss``, ``val/acc``, ``val/auc``, ``val/sensitivity``, ``val/specificity``, ``val/macro_f1``,
  ``val/balanced_accuracy``, ``perf/img_per_s``, ``perf/load_ms_per_patch``, ``perf/epoch_s``;
- per step, step = training patches seen over all ranks (runs with other rank counts or batch sizes
  line up): ``batch/loss``, ``batch/acc``, ``batch/lr``, ``batch/img_per_s`` — means over
  ``tracking.tensorboard.step_every`` steps of rank 0's batches;
- at the end, step = last epoch: ``model/val_*`` of the exported model (best epoch), ``model/best_epoch``;
- text ``config`` (the job and its config sections) and hparams (flattened study, launch and fold
  settings; metrics ``model/val_oacc``, ``model/val_loss``, ``val/acc``, ``val/loss``, ``train/loss``).

Resume: before anything is written the existing event files are rewritten into one that keeps only
the scalar points the checkpoint covers (epochs < epochs done, batch steps ≤ patches seen); text and
hparams are written anew. A killed and resumed job thus holds every point once, none from the lost
part of an epoch, and an epoch whose points never reached the disk (killed between its checkpoint
and the flush) is restored from the checkpoint's curves. A fresh start removes old event files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from ..core import fsio

EVENT_PREFIX = "events.out.tfevents."
BATCH_PREFIX = "batch/"
FINAL_PREFIX = "model/"
# curves.csv column → epoch tag (restoring epochs from the checkpoint)
CURVE_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "epoch_s": "perf/epoch_s",
}
HPARAM_METRICS = ("model/val_oacc", "model/val_loss", "val/acc", "val/loss", "train/loss")


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob(f"{EVENT_PREFIX}*") if p.is_file())


def _keeps(tag: str, step: int, epochs_done: int, patches_seen: int) -> bool:
    if tag.startswith(FINAL_PREFIX):
        return False  # written again at the end
    if tag.startswith(BATCH_PREFIX):
        return step <= patches_seen
    return step < epochs_done


def trim_events(run_dir: Path, epochs_done: int, patches_seen: int) -> set[int]:
    """Rewrite the run's event files into one holding only the scalar points a checkpoint at
    (``epochs_done``, ``patches_seen``) covers; returns the epochs that still have ``train/loss``."""
    files = event_files(run_dir)
    kept: list[bytes] = []
    version: bytes | None = None
    epochs: set[int] = set()
    for path in files:
        for raw in RawEventFileLoader(str(path)).Load():  # stops quietly at a torn last record
            event = event_pb2.Event.FromString(raw)
            if event.HasField("file_version"):
                version = version or raw
                continue
            if not event.HasField("summary"):
                continue
            values = [
                v
                for v in event.summary.value
                if v.HasField("simple_value") and _keeps(v.tag, event.step, epochs_done, patches_seen)
            ]
            if not values:
                continue  # text, hparams and points past the checkpoint
            if len(values) != len(event.summary.value):
                del event.summary.value[:]
                event.summary.value.extend(values)
                raw = event.SerializeToString()
            kept.append(raw)
            epochs.update(event.step for v in values if v.tag == "train/loss")
    if not kept:
        for path in files:
            path.unlink()
        return set()
    with fsio.atomic_path(files[0]) as tmp, open(tmp, "wb") as fh:  # the oldest name sorts first
        writer = RecordWriter(fh)
        for raw in [version] if version else []:
            writer.write(raw)
        for raw in kept:
            writer.write(raw)
    for path in files[1:]:
        path.unlink()
    return epochs


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``; lists as JSON text, None dropped."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        elif value is not None:
            out[name] = value
    return out


class EventLog:
    """The event files of one run directory (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        flush_s: float,
        epochs_done: int,
        patches_seen: int,
        curves: Iterable[Mapping[str, Any]],
        config_text: str,
        hparams: Mapping[str, Any],
    ):
        present = trim_events(run_dir, epochs_done, patches_seen)
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=flush_s, max_queue=1000)
        assert self.writer.file_writer is not None  # made by the constructor
        self._summaries: Any = self.writer.file_writer
        self.writer.add_text("config", config_text, 0)
        exp, ssi, sei = hparams_summaries(dict(hparams), dict.fromkeys(HPARAM_METRICS, 0.0))
        self._sei: Any = sei
        self._summaries.add_summary(exp)
        self._summaries.add_summary(ssi)
        for row in curves:
            if int(row["epoch"]) not in present and int(row["epoch"]) < epochs_done:
                self.scalars({tag: row.get(col) for col, tag in CURVE_TAGS.items()}, int(row["epoch"]))

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def finish(self, final: Mapping[str, float | None], step: int) -> None:
        self.scalars(final, step)
        self._summaries.add_summary(self._sei)
        self.close()

    def close(self) -> None:
        self.writer.close()
