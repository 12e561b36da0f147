"""Whole-slide inference (`medflow predict-wsi`): heatmaps, regions, detections and a slide score.

Per slide, with extraction's own code (`medflow.extract.wsi`): open with OpenSlide, level-0 µm/px,
the read plan for the model's µm/px and patch size, the tissue mask; then the tissue tiles on a
regular grid (`medflow.predict.tiling`), read in row-major order by `RegionReader` (optionally in
reader processes) in a background thread while the model classifies the previous batch (GPU when
present). Launched as N ranks (mpiexec/srun), each rank takes a contiguous share of the tiles and
rank 0 gathers them and writes. Outputs in ``--out-dir`` per slide:

- ``<id>.npz``: ``coords`` (N, 2) level-0 top-left (x, y) and ``rc`` (N, 2) lattice (row, col) of the
  tissue tiles, ``probabilities`` (N, C) float32 (NaN rows: tiles rejected as white/black by
  ``wsi.quality``), ``quality_ok``, ``tissue`` (fraction), ``probability_map`` (rows, cols, C) on the
  lattice, ``class_names`` and the geometry to map back: ``footprint``, ``stride`` (level-0 px; tile
  (r, c) starts at (c·stride, r·stride)), ``grid_shape``, ``dims``, ``level``, ``read_size``,
  ``patch_size``, ``mpp``, ``level0_mpp``;
- ``<id>.png``: the heatmap over the slide thumbnail with a colour bar (`medflow.predict.heatmap`);
- ``<id>.geojson``: regions ≥ ``predict_wsi.region_threshold`` as QuPath annotations;
- ``<id>.csv``: CAMELYON16 detections (``probability,x,y``, level-0 px);
- ``<id>.record.json`` (last): slide score and label, lesion matching for FROC, timings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import config as config_mod
from ..core import fsio
from ..core import progress as progress_mod
from ..core.errors import InputError
from ..core.manifest import ImageEntry
from ..core.manifest import entries as manifest_entries
from ..core.records import JobRecord
from ..extract.wsi import tissue
from ..extract.wsi.classes import class_map
from ..extract.wsi.reading import PatchSource
from ..extract.wsi.sampling import slide_annotations
from ..extract.wsi.slide import ReadPlan, choose_level, level0_mpp, open_slide
from ..train import dist as dist_mod
from ..train.evaluate import rank_slice
from ..train.models import load_model
from ..train.stain_setup import for_slide_pixels
from . import froc, regions
from .heatmap import write_heatmap
from .hsi import CLASS_COLOURS, cpu_threads
from .infer import check_model, infer_tiles
from .slide_metrics import slide_score
from .targets import named_or_outer_test
from .tiling import TileGrid, tile_grid

OUTPUT_SUFFIXES = (".npz", ".png", ".geojson", ".csv")


# ---- one slide ----------------------------------------------------------------------------------------
def slide_label(entry: ImageEntry, cfg: dict, cohort: str, has_positive: bool, positive: str) -> tuple[int, str]:
    """(1 positive | 0 negative, source): the manifest's ``label`` if given, else the annotation (any
    polygon of the positive class = positive; a slide without annotation is negative, as extraction
    treats it)."""
    classes = list(cfg["wsi"]["labels"]["classes"])
    if entry.label:
        manifest = cfg["cohorts"][cohort]["manifest"]
        if entry.label not in classes:
            raise InputError(
                manifest, f"{entry.image_id}: label {entry.label!r} is not in wsi.labels.classes {classes}"
            )
        if has_positive and entry.label != positive:
            raise InputError(
                manifest, f"{entry.image_id}: label {entry.label!r} but its annotation has {positive!r} polygons"
            )
        return int(entry.label == positive), "manifest"
    return int(has_positive), "annotation" if entry.annotation else "no annotation"


class SlideJob:
    """Everything shared by the slides of one `predict-wsi` call: config, model, ranks."""

    def __init__(
        self,
        cfg: dict,
        cohort: str,
        model: Any,
        meta: dict,
        model_path: str,
        d: dist_mod.Dist,
        positive: str,
    ):
        self.cfg, self.cohort, self.model, self.meta, self.model_path = cfg, cohort, model, meta, model_path
        self.d, self.positive = d, positive
        self.pcfg = cfg["predict_wsi"]
        self.class_names = list(cfg["wsi"]["labels"]["classes"])
        self.mpp = check_model(meta, model_path, cfg)
        self.normaliser = for_slide_pixels(meta, model_path)
        self.class_map = class_map(cfg["wsi"]["labels"])

    def plan(self, slide: Any, entry: ImageEntry) -> tuple[ReadPlan, str]:
        mpp0, source = level0_mpp(slide, entry, self.cfg, self.cohort)
        wsi_cfg = self.cfg["wsi"]
        plan = choose_level(
            slide.level_downsamples, mpp0, self.mpp, wsi_cfg["patch_size"], wsi_cfg["mpp_tolerance"], entry.image
        )
        return plan, source

    def tiles(self, slide: Any, entry: ImageEntry, plan: ReadPlan, rec: JobRecord) -> tuple[TileGrid, Any]:
        with rec.timed("mask"):
            tm = tissue.slide_tissue(slide, entry, plan.level0_mpp, self.cfg["wsi"]["tissue"])
        with rec.timed("grid"):
            try:
                grid = tile_grid(slide.dimensions, plan, tm, self.pcfg["overlap"], self.pcfg["tissue_min"])
            except InputError as exc:
                raise InputError(entry.image, exc.problem) from None
        if not len(grid.coords):
            raise InputError(
                entry.image,
                f"no tile has ≥ {self.pcfg['tissue_min']:.0%} tissue (predict_wsi.tissue_min; "
                f"tissue fraction of the slide {tm.fraction:.2%})",
            )
        return grid, tm

    def predict(self, entry: ImageEntry, rec: JobRecord) -> tuple[Any, ReadPlan, str, TileGrid, np.ndarray, np.ndarray]:
        """Every rank: its share of the tiles; rank 0 returns all of them (gathered)."""
        d, problem = self.d, None
        part: tuple[np.ndarray, np.ndarray, dict] = (
            np.zeros((0, len(self.class_names)), np.float32),
            np.zeros(0, bool),
            {},
        )
        slide = grid = plan = mpp_source = None
        try:
            with rec.timed("open"):
                slide = open_slide(entry.image)
                plan, mpp_source = self.plan(slide, entry)
            grid, _ = self.tiles(slide, entry, plan, rec)
            mine = rank_slice(len(grid.coords), d.rank, d.size)
            source = PatchSource(entry.image, slide, plan, self.pcfg["workers"])
            coords = grid.coords[mine]
            report = progress_mod.reporter(
                self.cfg, f"predict-wsi {entry.image_id}", len(coords), "tiles", enabled=d.is_root
            )
            try:
                t0 = time.perf_counter()
                probs, ok, stats = infer_tiles(
                    self.model,
                    self.normaliser,
                    source,
                    coords,
                    self.cfg["wsi"]["quality"],
                    self.pcfg["batch_size"],
                    d.device,
                    len(self.class_names),
                    report.advance,
                )
                stats["infer"] = time.perf_counter() - t0
            finally:
                source.close()
                report.close()
            part = (probs, ok, stats)
        except InputError as exc:
            problem = (str(exc.path) if exc.path else entry.image, exc.problem)
            if slide is not None:
                slide.close()
        gathered = d.allgather_object((part, problem)) if d.size > 1 else [(part, problem)]
        for _, prob in gathered:
            if prob is not None:
                raise InputError(prob[0], prob[1])
        assert slide is not None and plan is not None and grid is not None and mpp_source is not None
        probs = np.concatenate([g[0][0] for g in gathered])
        ok = np.concatenate([g[0][1] for g in gathered])
        for key in ("read", "wait", "predict", "infer"):  # the slowest rank's time is the job's
            rec["timings_s"][key] = max(g[0][2].get(key, 0.0) for g in gathered)
        return slide, plan, mpp_source, grid, probs, ok

    def run(self, entry: ImageEntry, out_dir: Path, study: str | None, outer: int | None) -> dict | None:
        rec = JobRecord(
            "predict-wsi",
            self.cfg,
            ("wsi", "predict_wsi"),
            study=study,
            outer=outer,
            cohort=self.cohort,
            image_id=entry.image_id,
            patient_id=entry.patient_id,
            model=self.model_path,
            model_sha256=fsio.sha256_file(self.model_path),
            class_names=self.class_names,
            positive_class=self.positive,
            stain=self.meta.get("stain") or None,
            device=str(self.d.device),
            ranks=self.d.size,
            threads=torch.get_num_threads(),
        )
        slide, plan, mpp_source, grid, probs, ok = self.predict(entry, rec)
        if not self.d.is_root:
            slide.close()
            return None
        written: list[Path] = []
        try:
            self.write(entry, out_dir, rec, slide, plan, mpp_source, grid, probs, ok, written)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        finally:
            slide.close()
        return dict(rec)

    def write(
        self,
        entry: ImageEntry,
        out_dir: Path,
        rec: JobRecord,
        slide: Any,
        plan: ReadPlan,
        mpp_source: str,
        grid: TileGrid,
        probs: np.ndarray,
        ok: np.ndarray,
        written: list[Path],
    ) -> None:
        pcfg, names = self.pcfg, self.class_names
        pos = names.index(self.positive)
        dims: tuple[int, int] = slide.dimensions
        prob_grid = grid.to_grid(probs)
        t0 = time.perf_counter()
        with rec.timed("annotations"):
            ann = slide_annotations(entry, dims, self.class_map)
            positive_polygons = ann.polygons_of([pos])
            label, label_source = slide_label(entry, self.cfg, self.cohort, bool(positive_polygons), self.positive)
            lesions = froc.lesion_mask(positive_polygons, ann.exclude, dims, plan.level0_mpp)
        rc_points = regions.detections(
            prob_grid[..., pos], pcfg["nms_radius_um"] / (grid.stride * plan.level0_mpp), pcfg["detection_min"]
        )
        # A detection is the centre of its tile as read (the tile's level-0 top-left + half a tile).
        tile_xy = np.round(rc_points[:, [1, 0]] * grid.stride) + grid.footprint / 2
        points = np.column_stack([tile_xy, rc_points[:, 2]]).reshape(-1, 3)
        # regions of the positive class; with more classes, of every class but unannotated tissue's
        background = self.class_map.background if self.class_map.background is not None else 0
        region_classes = [pos] if len(names) == 2 else [c for c in range(len(names)) if c != background]
        features = []
        for c in region_classes:
            colour = CLASS_COLOURS.get(names[c].lower(), (220, 0, 0))
            features += regions.region_features(
                np.nan_to_num(prob_grid[..., c], nan=-1.0) >= pcfg["region_threshold"],
                prob_grid[..., c],
                grid.stride,
                (grid.footprint - grid.stride) / 2,
                names[c],
                colour,
                plan.level0_mpp,
            )
        score = slide_score(probs[ok, pos], pcfg["aggregation"], pcfg["top_k"])
        base = out_dir / entry.image_id
        paths = {suffix: Path(f"{base}{suffix}") for suffix in OUTPUT_SUFFIXES}
        fsio.write_npz(
            paths[".npz"],
            compressed=True,
            coords=grid.coords,
            rc=grid.rc,
            probabilities=probs,
            quality_ok=ok,
            tissue=grid.tissue,
            probability_map=prob_grid,
            class_names=np.array(names),
            footprint=grid.footprint,
            stride=grid.stride,
            grid_shape=np.array(grid.shape),
            dims=np.array(dims),
            level=plan.level,
            read_size=plan.read_size,
            patch_size=plan.patch_size,
            mpp=plan.mpp,
            level0_mpp=plan.level0_mpp,
        )
        written.append(paths[".npz"])
        thumb, opaque, thumb_cell, _ = tissue.thumbnail(slide, max(dims) / pcfg["heatmap_px"])
        thumb = np.where(opaque[..., None], thumb, 255).astype(np.uint8)
        panels = [pos] if len(names) == 2 else list(range(len(names)))
        title = f"{entry.image_id}: slide score {score:.3f} ({pcfg['aggregation']}), label {names[pos] if label else 'negative'}"
        write_heatmap(paths[".png"], thumb, thumb_cell, grid, prob_grid, names, panels, title)
        written.append(paths[".png"])
        regions.write_geojson(paths[".geojson"], features)
        written.append(paths[".geojson"])
        regions.write_detections_csv(paths[".csv"], points)
        written.append(paths[".csv"])
        rec["timings_s"]["write"] = time.perf_counter() - t0
        n_pred = int(ok.sum())
        rec.update(
            geometry={
                **plan.summary(mpp_source),
                "footprint": grid.footprint,
                "stride": grid.stride,
                "overlap": 1 - grid.stride / grid.footprint,
                "grid_shape": list(grid.shape),
                "dims": list(dims),
            },
            tiles={"tissue": len(grid.coords), "predicted": n_pred, "quality_rejected": len(grid.coords) - n_pred},
            slide={
                "score": score,
                "aggregation": pcfg["aggregation"],
                "top_k": pcfg["top_k"],
                "label": label,
                "label_source": label_source,
                "predicted_positive": bool(score is not None and score >= pcfg["slide_threshold"]),
            },
            lesions={**froc.match(points, lesions), "components": lesions.n_components, "itc": len(lesions.itc)},
            detections=len(points),
            regions=len(features),
            outputs={k.lstrip("."): p.name for k, p in paths.items()},
        )
        infer_s = rec["timings_s"].get("infer") or 0.0
        busy = rec["timings_s"].get("predict", 0.0)
        rec["throughput"] = {
            "tiles_per_s": len(grid.coords) / infer_s if infer_s else None,
            "model_busy_fraction": busy / infer_s if infer_s else None,
        }
        rec.finish("ok").save(Path(f"{base}.record.json"))
        print(
            f"predict-wsi {entry.image_id}: {len(grid.coords)} tiles ({n_pred} predicted) on a {grid.shape[0]}×"
            f"{grid.shape[1]} grid, score {score:.3f}, {len(features)} regions, {len(points)} detections → {paths['.png']}"
        )


# ---- CLI ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True, help="model.pt written by `medflow select` / `medflow train`")
    p.add_argument("--cohort", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-ids", nargs="+", help="slides of the cohort to predict")
    which.add_argument("--all", action="store_true", help="every slide of the cohort's manifest")
    which.add_argument("--folds", help="fold plan: the slides of outer fold --outer's test patients")
    p.add_argument("--study", help="study (recorded; its positive_class is the default)")
    p.add_argument("--outer", type=int, help="outer fold (recorded; selects test slides with --folds)")
    p.add_argument("--positive-class", help="class of the heatmap, regions, detections and slide score")
    p.add_argument("--out-dir", required=True, help="directory for <id>.{npz,png,geojson,csv,record.json}")
    progress_mod.add_quiet_argument(p)


def slides_to_predict(cfg: dict, args: argparse.Namespace) -> list[ImageEntry]:
    if args.all:
        return manifest_entries(cfg, args.cohort)
    return named_or_outer_test(cfg, args, "slide")


def make_dist(cfg: dict) -> dist_mod.Dist:
    """One process, or the ranks the launcher started (tiles are sharded across them)."""
    wanted = cfg["predict_wsi"]["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise InputError("config", "predict_wsi.device is cuda but no CUDA device is visible")
    threads = cpu_threads()
    _, size, _ = dist_mod.launcher_ranks()
    if size != 1:
        d = dist_mod.init(cfg["launch"]["backend"], threads)
    else:
        dist_mod.set_threads(threads)
        d = dist_mod.Dist()
        if wanted != "cpu" and torch.cuda.is_available():
            d.device = torch.device("cuda", 0)
    if wanted == "cpu":
        d.device = torch.device("cpu")
    return d


def run(args: argparse.Namespace) -> int:
    cfg = progress_mod.apply_quiet(config_mod.load(args.config), args.quiet)
    if args.cohort not in cfg["cohorts"] or cfg["cohorts"][args.cohort]["kind"] != "wsi":
        raise InputError(args.config, f"cohorts.{args.cohort} is not a WSI cohort")
    study_cfg = config_mod.study(cfg, args.study, args.config) if args.study else None
    items = slides_to_predict(cfg, args)
    model, meta = load_model(args.model)
    check_model(meta, args.model, cfg)  # before anything else: a model that does not fit is the error to name
    names = list(cfg["wsi"]["labels"]["classes"])
    positive = str(
        args.positive_class or (study_cfg or {}).get("positive_class") or meta.get("positive_class") or names[-1]
    )
    if positive not in names:
        raise InputError(args.config, f"positive class {positive!r} is not in wsi.labels.classes {names}")
    d = make_dist(cfg)
    try:
        job = SlideJob(cfg, args.cohort, model.to(d.device).eval(), meta, str(args.model), d, positive)
        for entry in items:
            job.run(entry, Path(args.out_dir), args.study, args.outer)
    finally:
        d.shutdown()
    return 0
