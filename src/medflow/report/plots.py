"""Report figures (matplotlib, Agg backend, PNG): bars with error bars per site, learning curves,
confusion matrices, HSI classification maps and energy. Every figure is drawn from the summaries only."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..core import fsio  # noqa: E402

SITE_COLOURS = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap
JOB_COLOURS = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
DPI = 100
_PNG_META = {"Software": None}  # no tool URL/version inside the PNG: figures stay byte-stable


def _save(fig: plt.Figure, path: Path) -> None:
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata=_PNG_META)
    plt.close(fig)


def _figure(out_dir: Path, name: str, title: str, caption: str, fig: plt.Figure) -> dict[str, Any]:
    path = out_dir / f"{name}.png"
    _save(fig, path)
    return {"name": name, "title": title, "path": f"figures/{name}.png", "abs_path": str(path), "caption": caption}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def clipped_errors(means: np.ndarray, stds: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """(2, n) lower/upper error bar lengths: ± std, cut at ``bounds`` (a metric's range), data unchanged."""
    means, stds = np.nan_to_num(means), np.nan_to_num(stds)
    lower, upper = stds.copy(), stds.copy()
    if bounds is not None:
        lower = np.clip(np.minimum(lower, means - bounds[0]), 0, None)
        upper = np.clip(np.minimum(upper, bounds[1] - means), 0, None)
    return np.stack([lower, upper])


def _grouped_bars(
    ax: plt.Axes,
    groups: list[str],
    labels: list[str],
    means: np.ndarray,
    stds: np.ndarray,
    bounds: tuple[float, float] | None = None,
) -> None:
    """One group of bars per x item, one bar per site, error bars = std cut at ``bounds`` (NaN = not measured)."""
    n_sites = len(labels)
    width = 0.8 / max(n_sites, 1)
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        ax.bar(
            x + (i - (n_sites - 1) / 2) * width,
            np.nan_to_num(means[:, i]),
            width,
            yerr=clipped_errors(means[:, i], stds[:, i], bounds),
            capsize=3,
            label=label,
            color=SITE_COLOURS[i % 10],
        )
    ax.set_xticks(x, groups, rotation=0 if len(groups) < 4 else 20, ha="center" if len(groups) < 4 else "right")
    ax.grid(axis="y", alpha=0.3)


def _stat(stat: dict | None) -> tuple[float, float]:
    if not stat or stat.get("mean") is None:
        return np.nan, np.nan
    return float(stat["mean"]), float(stat.get("std") or 0.0)


def accuracy_figure(summaries: list[dict], labels: list[str], studies: list[str]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(studies), figsize=(4.2 * len(studies) + 0.6, 3.4), squeeze=False)
    for ax, study in zip(axes[0], studies):
        splits = ["train_oacc", "val_oacc", "test_oacc"]
        means = np.full((3, len(labels)), np.nan)
        stds = np.full((3, len(labels)), np.nan)
        for j, s in enumerate(summaries):
            st = s["studies"].get(study)
            for i, key in enumerate(splits):
                if st:
                    means[i, j], stds[i, j] = _stat(st[key])
        _grouped_bars(ax, ["train", "val", "test"], labels, means, stds, bounds=(0.0, 1.0))
        ax.set_ylim(0, 1.05)
        ax.set_title(study)
        ax.set_ylabel("overall accuracy")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def timing_figure(summaries: list[dict], labels: list[str], studies: list[str], cohorts: list[str]) -> plt.Figure:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    means = np.full((len(cohorts), len(labels)), np.nan)
    stds = np.full_like(means, np.nan)
    for j, s in enumerate(summaries):
        for i, cohort in enumerate(cohorts):
            p = s["preprocessing"].get(cohort)
            if p:
                means[i, j], stds[i, j] = _stat(p.get("s_per_patch_images"))
    _grouped_bars(ax1, cohorts, labels, means * 1000, stds * 1000)
    ax1.set_ylabel("extraction ms / patch")
    ax1.set_title("pre-processing (mean ± std over images)")
    means = np.full((len(studies), len(labels)), np.nan)
    stds = np.full_like(means, np.nan)
    for j, s in enumerate(summaries):
        for i, study in enumerate(studies):
            st = s["studies"].get(study)
            if st:
                means[i, j], stds[i, j] = _stat(st["s_per_epoch"])
    _grouped_bars(ax2, studies, labels, means, stds)
    ax2.set_ylabel("s / epoch")
    ax2.set_title("training (mean ± std over jobs)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(summaries: list[dict], labels: list[str], study: str, max_curves: int) -> plt.Figure | None:
    cols = [(label, s["studies"][study]) for label, s in zip(labels, summaries) if study in s["studies"]]
    cols = [(label, st) for label, st in cols if any(c.get("epoch") for c in st["curves"])]
    if not cols:
        return None
    fig, axes = plt.subplots(2, len(cols), figsize=(4.2 * len(cols) + 0.4, 6), squeeze=False, sharex="col")
    for j, (label, st) in enumerate(cols):
        loss_ax, acc_ax = axes[0][j], axes[1][j]
        for key, colour, style in (("train_loss", "C0", "-"), ("val_loss", "C1", "-")):
            _curve_set(loss_ax, st["curves"][:max_curves], key, colour, style)
        for key, colour, style in (("train_acc", "C0", "-"), ("val_acc", "C1", "-")):
            _curve_set(acc_ax, st["curves"][:max_curves], key, colour, style)
        loss_ax.set_title(f"{label}: {study} ({len(st['curves'])} runs)")
        loss_ax.set_ylabel("loss")
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_xlabel("epoch")
        acc_ax.set_ylim(0, 1.05)
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _curve_set(ax: plt.Axes, curves: list[dict], key: str, colour: str, style: str) -> None:
    """Each run as a thin line, the mean over runs (per epoch) in bold."""
    by_epoch: dict[float, list[float]] = {}
    for c in curves:
        xs, ys = c.get("epoch") or [], c.get(key) or []
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), color=colour, alpha=0.25, lw=0.8, ls=style)
        for x, y in pts:
            by_epoch.setdefault(x, []).append(y)
    if by_epoch:
        xs = sorted(by_epoch)
        ax.plot(xs, [np.mean(by_epoch[x]) for x in xs], color=colour, lw=2, ls=style, label=key.replace("_", " "))


def confusion_figure(summaries: list[dict], labels: list[str], study: str) -> plt.Figure | None:
    panels = []
    for label, s in zip(labels, summaries):
        st = s["studies"].get(study)
        total, names = summed_confusion(st["outer"] if st else [])
        if total is not None:
            panels.append((label, total, names))
    if not panels:
        return None
    size = max(3.2, 0.6 * len(panels[0][2]) + 1.6)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (label, total, names) in zip(axes[0], panels):
        rows = total.sum(axis=1, keepdims=True)
        norm = np.divide(total, rows, out=np.zeros_like(total, dtype=float), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for (i, k), count in np.ndenumerate(total):
            ax.text(
                k,
                i,
                f"{int(count)}\n{norm[i, k]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, k] > 0.6 else "black",
            )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{label}: {study}")
    fig.tight_layout()
    return fig


def summed_confusion(folds: list[dict]) -> tuple[np.ndarray | None, list[str]]:
    """Sum of the outer folds' test confusion matrices (rows true, columns predicted)."""
    total, names = None, []
    for fold in folds:
        conf = (fold.get("test") or {}).get("confusion")
        if not conf:
            continue
        arr = np.asarray(conf, dtype=float)
        if total is None:
            total, names = arr, list((fold.get("test") or {}).get("class_names") or range(len(arr)))
        elif arr.shape == total.shape:
            total = total + arr
    return total, [str(n) for n in names]


def energy_figure(summaries: list[dict], labels: list[str]) -> plt.Figure:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    jobs = []
    for s in summaries:
        for job in s["energy"]["by_job"]:
            if job not in jobs:
                jobs.append(job)
    x = np.arange(len(labels))
    bottom_k = np.zeros(len(labels))
    bottom_c = np.zeros(len(labels))
    for i, job in enumerate(jobs):
        kwh = np.array([s["energy"]["by_job"].get(job, {}).get("kwh", 0.0) for s in summaries])
        co2 = np.array([s["energy"]["by_job"].get(job, {}).get("co2_g", 0.0) for s in summaries])
        colour = JOB_COLOURS[i % len(JOB_COLOURS)]
        ax1.bar(x, kwh, 0.6, bottom=bottom_k, label=job, color=colour)
        ax2.bar(x, co2, 0.6, bottom=bottom_c, label=job, color=colour)
        bottom_k += kwh
        bottom_c += co2
    for ax, unit in ((ax1, "energy (kWh)"), (ax2, "CO₂ (g)")):
        ax.set_xticks(x, labels)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def copy_maps(summaries: list[dict], labels: list[str], out_dir: Path) -> list[dict[str, Any]]:
    """HSI classification maps (PNGs written by predict-hsi) copied next to the report's figures."""
    figures = []
    for label, s in zip(labels, summaries):
        for study, st in s["studies"].items():
            for m in st.get("maps", []):
                src = Path(s["site_dir"]) / m["png"]
                if not src.is_file():
                    continue
                name = _safe(f"map_{label}_{study}_outer{m.get('outer')}_{m['image_id']}")
                dest = out_dir / f"{name}.png"
                with fsio.atomic_path(dest) as tmp:
                    shutil.copyfile(src, tmp)
                acc = m.get("accuracy")
                figures.append(
                    {
                        "name": name,
                        "title": f"HSI classification map — {label}, {study}, outer fold "
                        f"{m.get('outer')}, {m['image_id']}",
                        "path": f"figures/{name}.png",
                        "abs_path": str(dest),
                        "kind": "map",
                        "caption": f"accuracy on labelled pixels {acc:.3f}" if acc is not None else "",
                    }
                )
    return figures


def make_figures(summaries: list[dict], labels: list[str], out_dir: Path, cfg: dict) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = [st for s in summaries for st in s["studies"]]
    studies = list(dict.fromkeys(studies))
    cohorts = list(dict.fromkeys(c for s in summaries for c in s["preprocessing"]))
    max_curves = int(cfg.get("report", {}).get("max_curves", 12))
    figures = []
    if studies:
        figures.append(
            _figure(
                out_dir,
                "accuracy",
                "Accuracy per site (mean ± std over folds)",
                "train/val: inner runs; test: outer folds' selected models; error bars ± std, cut at 1.0 "
                "(the tables give the full std)",
                accuracy_figure(summaries, labels, studies),
            )
        )
    if studies or cohorts:
        figures.append(
            _figure(
                out_dir,
                "timings",
                "Pre-processing and training time per site",
                "error bars: std over images (left) and training jobs (right)",
                timing_figure(summaries, labels, studies, cohorts),
            )
        )
    for study in studies:
        fig = curves_figure(summaries, labels, study, max_curves)
        if fig is not None:
            figures.append(
                _figure(
                    out_dir,
                    _safe(f"curves_{study}"),
                    f"Learning curves — {study}",
                    "thin: each (outer, inner) run; bold: mean per epoch",
                    fig,
                )
            )
        fig = confusion_figure(summaries, labels, study)
        if fig is not None:
            figures.append(
                _figure(
                    out_dir,
                    _safe(f"confusion_{study}"),
                    f"Confusion matrix — {study}",
                    "test sets of all outer folds summed; count and row fraction",
                    fig,
                )
            )
    figures += copy_maps(summaries, labels, out_dir)
    figures.append(
        _figure(
            out_dir,
            "energy",
            "Energy and CO₂ estimate per site",
            "stacked by job type",
            energy_figure(summaries, labels),
        )
    )
    return figures
