"""Cohort manifests: which images belong to a cohort, which patient each comes from, where its files are.

A cohort is named in the config (``cohorts.<name>``) with the CSV manifest that lists its images;
there is no implicit cohort: the demo writes real manifests too (``medflow synth``).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from . import fsio
from .errors import InputError

COLUMNS = ("image_id", "patient_id", "image", "annotation", "white", "dark", "mpp", "mask", "label")
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ImageEntry:
    image_id: str
    patient_id: str
    image: str
    annotation: str = ""  # WSI: ASAP XML / GeoJSON polygons; HSI: ground-truth map
    white: str = ""  # HSI raw mosaics: white reference frame
    dark: str = ""  # HSI raw mosaics: dark reference frame
    mpp: float | None = None  # WSI: level-0 µm/px when the slide has no mpp metadata
    mask: str = ""  # WSI: optional user tissue mask image
    label: str = ""  # WSI: optional slide-level class name (slide metrics); "" = from the annotation

    def files(self) -> list[str]:
        """Every input file of this entry (what a Snakemake rule depends on)."""
        return [p for p in (self.image, self.annotation, self.white, self.dark, self.mask) if p]


def read_manifest(path: str | Path) -> list[ImageEntry]:
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise InputError(path, "manifest not found") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable CSV manifest ({exc})") from None
    if not rows:
        raise InputError(path, "manifest lists no images")
    missing = {"image_id", "patient_id", "image"} - set(header)
    if missing:
        raise InputError(path, f"manifest lacks column(s) {sorted(missing)}")
    unknown = set(header) - set(COLUMNS)
    if unknown:
        raise InputError(path, f"unknown manifest column(s) {sorted(unknown)}; allowed: {list(COLUMNS)}")
    entries, seen = [], set()
    for line, row in enumerate(rows, start=2):
        image_id, patient_id = (row.get("image_id") or "").strip(), (row.get("patient_id") or "").strip()
        if not _ID.match(image_id) or not _ID.match(patient_id):
            raise InputError(path, f"line {line}: image_id/patient_id must match {_ID.pattern}")
        if image_id in seen:
            raise InputError(path, f"line {line}: duplicate image_id {image_id!r}")
        seen.add(image_id)
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise InputError(path, f"line {line}: mpp {mpp_text!r} is not a number") from None
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise InputError(path, f"line {line}: mpp {mpp_text!r} must be a finite number > 0 (µm per pixel)")
        resolved = {k: _resolve(path, row.get(k)) for k in ("image", "annotation", "white", "dark", "mask")}
        if not resolved["image"]:
            raise InputError(path, f"line {line}: empty image path")
        label = (row.get("label") or "").strip()
        entries.append(ImageEntry(image_id=image_id, patient_id=patient_id, mpp=mpp, label=label, **resolved))
    return entries


def _resolve(manifest: Path, value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        return ""
    p = Path(value)
    return str(p if p.is_absolute() else manifest.parent / p)


def write_manifest(path: str | Path, entries: list[ImageEntry]) -> None:
    """Write entries with paths relative to the manifest's directory (the folder stays relocatable)."""
    path = Path(path)
    lines = [",".join(COLUMNS)]
    for e in entries:
        row = asdict(e)
        for k in ("image", "annotation", "white", "dark", "mask"):
            if row[k]:
                row[k] = str(Path(row[k]).resolve().relative_to(path.parent.resolve()))
        row["mpp"] = "" if row["mpp"] is None else repr(row["mpp"])
        lines.append(",".join(str(row[c]) for c in COLUMNS))
    fsio.write_text(path, "\n".join(lines) + "\n")


def entries(cfg: dict, cohort: str) -> list[ImageEntry]:
    """The images of cohort ``cohort``: the rows of its manifest (``cohorts.<name>.manifest``)."""
    if cohort not in cfg["cohorts"]:
        raise InputError("config", f"unknown cohort {cohort!r}; defined: {sorted(cfg['cohorts'])}")
    return read_manifest(cfg["cohorts"][cohort]["manifest"])


def entry(cfg: dict, cohort: str, image_id: str) -> ImageEntry:
    for e in entries(cfg, cohort):
        if e.image_id == image_id:
            return e
    raise InputError(cfg["cohorts"][cohort]["manifest"], f"no image {image_id!r} in cohort {cohort!r}")
