"""`medflow grad-cam`: Grad-CAM maps of a stratified sample of one outer fold's test patches.

From `medflow select`'s ``predictions.npz`` (labels, probabilities, coordinates and slides of the
outer test patches) it draws, per true class, up to ``gradcam.per_group`` correctly and as many
wrongly classified patches (seeded: stream ``<study>/<outer>/gradcam``), reads them from their
shards, computes Grad-CAM of the predicted class (`medflow.predict.gradcam`) and writes one figure
grid ``gradcam.png`` (a row per group: patch with the map overlaid, truth, prediction and its
probability) and ``record.json`` (job "grad-cam": the sampled patches).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..core import config as config_mod  # noqa: E402
from ..core import fsio  # noqa: E402
from ..core.errors import InputError  # noqa: E402
from ..core.index import load_index  # noqa: E402
from ..core.records import JobRecord  # noqa: E402
from ..core.seeds import rng_for  # noqa: E402
from ..train.models import load_model  # noqa: E402
from ..train.stain_setup import check_model_shards, for_shard_patches  # noqa: E402
from .gradcam import grad_cam, upsample  # noqa: E402
from .hsi import cpu_threads  # noqa: E402

_PNG_META = {"Software": None}


def sample_groups(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, per_group: int, rng: np.random.Generator
) -> list[tuple[int, bool, np.ndarray]]:
    """[(true class, correct?, sorted sample of row indices)] for every class, correct then wrong."""
    groups = []
    for c in range(n_classes):
        for correct in (True, False):
            rows = np.flatnonzero((y_true == c) & ((y_pred == c) == correct))
            take = min(per_group, len(rows))
            groups.append((c, correct, np.sort(rng.choice(rows, size=take, replace=False)) if take else rows[:0]))
    return groups


def read_patches(index: dict, image_ids: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The shard patches at (image_id, level-0 coords), one row read per patch (a handful of them)."""
    shards = {s["image_id"]: s["path"] for s in index["shards"]}
    out = []
    for image_id, xy in zip(image_ids.tolist(), coords.tolist()):
        if image_id not in shards:
            raise InputError(None, f"slide {image_id!r} of the predictions is not in the cohort index")
        with h5py.File(shards[image_id], "r") as h5:
            rows = np.flatnonzero((h5["coords"][:] == np.asarray(xy)).all(axis=1))
            if not len(rows):
                raise InputError(shards[image_id], f"no patch at {xy}")
            out.append(h5["patches"][int(rows[0])])
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def write_grid(path: Path, groups: list[dict[str, Any]], class_names: list[str], per_group: int, title: str) -> None:
    """Rows = (true class, correct|wrong), columns = samples: the patch with its Grad-CAM overlaid."""
    rows, cols = len(groups), max(1, per_group)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.6, 2.05 * rows + 0.5), squeeze=False)
    for r, group in enumerate(groups):
        label = f"{class_names[group['true']]}\n{'correct' if group['correct'] else 'wrong'}"
        axes[r][0].annotate(
            label, xy=(-0.12, 0.5), xycoords="axes fraction", ha="right", va="center", fontsize=9, rotation=0
        )
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(group["samples"]):
                ax.text(0.5, 0.5, "none" if c == 0 else "", ha="center", va="center", fontsize=8, color="#777")
                for side in ax.spines.values():
                    side.set_visible(False)
                continue
            s = group["samples"][c]
            ax.imshow(s["patch"])
            ax.imshow(s["cam"], cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(f"pred {class_names[s['pred']]} {s['prob']:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata=_PNG_META)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--outer", type=int, required=True)
    p.add_argument("--model", required=True, help="the outer fold's model.pt (medflow select)")
    p.add_argument("--predictions", required=True, help="the outer fold's predictions.npz (medflow select)")
    p.add_argument("--index", required=True, help="cohort index JSON (where the shards are)")
    p.add_argument("--out-dir", required=True, help="directory for gradcam.png and record.json")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    config_mod.study(cfg, args.study, args.config)
    per_group = int(cfg["gradcam"]["per_group"])
    torch.set_num_threads(cpu_threads())
    record = JobRecord("grad-cam", cfg, ("gradcam", f"studies.{args.study}"), study=args.study, outer=args.outer)
    with record.timed("load"):
        model, meta = load_model(args.model)
        index = load_index(args.index)
        try:
            with np.load(args.predictions) as npz:
                y_true, y_prob = npz["y_true"], npz["y_prob"]
                coords, image_ids = npz["coords"], npz["image_ids"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(args.predictions, f"not a predictions file of medflow select ({exc})") from None
    if index["kind"] == "wsi":  # the patches the model sees are prepared as in its training
        check_model_shards(meta, [s["path"] for s in index["shards"]])
    normaliser = for_shard_patches(meta, args.model)
    names = list(meta.get("class_names") or index["class_names"])
    if y_prob.ndim != 2 or y_prob.shape[1] != len(names):
        raise InputError(args.predictions, f"probabilities {y_prob.shape} do not match the model's classes {names}")
    y_pred = y_prob.argmax(axis=1) if len(y_prob) else np.zeros(0, np.int64)
    rng = rng_for(cfg["seed"], args.study, args.outer, "gradcam")
    groups: list[dict[str, Any]] = []
    with record.timed("gradcam"):
        for c, correct, rows in sample_groups(y_true, y_pred, len(names), per_group, rng):
            group: dict[str, Any] = {"true": c, "correct": correct, "available": 0, "samples": []}
            group["available"] = int(((y_true == c) & ((y_pred == c) == correct)).sum())
            if len(rows):
                try:
                    patches = read_patches(index, image_ids[rows], coords[rows])
                except InputError as exc:  # a slide the index does not know: the predictions are from elsewhere
                    raise InputError(exc.path or args.predictions, exc.problem) from None
                if normaliser is not None:
                    patches = normaliser.apply(patches)
                cams, probs = grad_cam(model, torch.from_numpy(patches))
                up = upsample(cams, patches.shape[1:3])
                for i, row in enumerate(rows.tolist()):
                    pred = int(probs[i].argmax())
                    group["samples"].append(
                        {
                            "row": row,
                            "image_id": str(image_ids[row]),
                            "coords": coords[row].tolist(),
                            "pred": pred,
                            "prob": float(probs[i, pred]),
                            "patch": patches[i] if patches.shape[-1] == 3 else patches[i][..., :3].astype(np.float32),
                            "cam": up[i],
                        }
                    )
            groups.append(group)
    out_dir = Path(args.out_dir)
    with record.timed("write"):
        title = f"Grad-CAM — {args.study}, outer fold {args.outer} (predicted class; stratified test sample)"
        write_grid(out_dir / "gradcam.png", groups, names, per_group, title)
    record["class_names"] = names
    record["groups"] = [
        {
            "true": names[g["true"]],
            "correct": g["correct"],
            "available": g["available"],
            "samples": [
                {k: s[k] for k in ("image_id", "coords", "prob")} | {"pred": names[s["pred"]]} for s in g["samples"]
            ],
        }
        for g in groups
    ]
    record["figure"] = "gradcam.png"
    record.finish("ok").save(out_dir / "record.json")
    print(f"grad-cam {out_dir / 'gradcam.png'}: {sum(len(g['samples']) for g in groups)} patches")
    return 0
