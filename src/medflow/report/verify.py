"""`medflow verify RESULTS_DIR`: audit a site's results without recomputing them.

What it checks, reading only the results directory (paths inside it are relative, so a copy moved
anywhere verifies the same):
- **shards** — every shard each cohort index lists is there, re-hashed in full to its recorded SHA-256,
  and holds the image, patient, patch and label counts the index lists; its extraction record agrees;
  no source image appears twice;
- **fold plans** — every split is disjoint by patient and covers its pool; the plan was made from
  this state of its index;
- **training, selection, refit, test** — each record finished, trained or tested exactly the patients
  the plan gives its fold (train, validation and test disjoint), on the shard contents the index lists
  now (a record whose data digests differ is stale), and its outputs (model, curves, predictions) are
  the files it wrote (SHA-256);
- **completeness** — every job the site's config implies has a finished record.

Each problem is one line ``medflow verify: problem: <file>: <what>``; the table of checks goes to
stdout, ``--out`` writes them as JSON (read by `medflow summarize`, so the report states whether its
results verified). Exit 0 when everything verifies, 3 when there are problems (2: unusable input).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import label_counts, load_index
from ..core.records import now_iso
from ..core.shards import open_shard, read_attrs
from ..train.splits import check_index, check_plan, fold_patients

VERIFY_FORMAT = "medflow-verify/1"
PROBLEMS_FOUND = 3


@dataclass
class Audit:
    """Checks done and problems found, per area."""

    site_dir: Path
    checked: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)

    def ok(self, area: str) -> None:
        self.checked[area] += 1

    def problem(self, area: str, path: Path | str, what: str) -> None:
        self.checked[area] += 1
        self.problems.append({"area": area, "file": self.rel(path), "problem": what})

    def rel(self, path: Path | str) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.site_dir.resolve()))
        except ValueError:
            return str(path)


# ---- shards and indexes -------------------------------------------------------------------------
def audit_indexes(audit: Audit, rehash: bool) -> dict[str, dict]:
    indexes = {}
    for path in sorted(audit.site_dir.glob("index/*.json")):
        try:
            index = load_index(path)
        except InputError as exc:
            audit.problem("indexes", path, exc.problem)
            continue
        audit.ok("indexes")
        indexes[index["cohort"]] = index
        sources: dict[str, str] = {}
        for entry in index["shards"]:
            _audit_shard(audit, index, entry, rehash)
            source = entry.get("source_sha256")
            if source and source in sources:
                audit.problem("shards", entry["path"], f"same source image as {sources[source]!r}")
            elif source:
                sources[source] = entry["image_id"]
    return indexes


def _audit_shard(audit: Audit, index: dict, entry: dict, rehash: bool) -> None:
    path = Path(entry["path"])
    if not path.is_file():
        audit.problem("shards", path, "listed in the cohort index but missing")
        return
    sha = fsio.sha256_file(path) if rehash else entry["sha256"]
    if sha != entry["sha256"]:
        audit.problem("shards", path, f"content differs from the index (sha256 {entry['sha256'][:12]}… → {sha[:12]}…)")
        return
    try:
        with open_shard(path) as h5:
            attrs = read_attrs(h5)
            counts = label_counts(h5["labels"][:], index["class_names"])
    except InputError as exc:
        audit.problem("shards", path, exc.problem)
        return
    for key in ("image_id", "patient_id"):
        if attrs.get(key) != entry[key]:
            audit.problem("shards", path, f"holds {key} {attrs.get(key)!r}, the index lists {entry[key]!r}")
            return
    if counts != entry["counts"]:
        audit.problem("shards", path, f"holds labels {counts}, the index lists {entry['counts']}")
        return
    record = path.with_name(f"{entry['image_id']}.record.json")
    recorded = (_read(record) or {}).get("shard_identity") or {}
    if recorded.get("sha256") not in (None, entry["sha256"]):
        audit.problem("shards", record, "extraction record names another shard content than the index")
        return
    audit.ok("shards")


def _read(path: Path) -> dict | None:
    try:
        return fsio.read_json_document(path, "record")
    except InputError:
        return None


# ---- fold plans and jobs ------------------------------------------------------------------------
def audit_plans(audit: Audit, indexes: dict[str, dict]) -> dict[str, dict]:
    plans = {}
    for path in sorted(audit.site_dir.glob("folds/*.json")):
        try:
            plan = fsio.read_json_document(path, "fold plan")
            check_plan(plan, path)
            index = indexes.get(str(plan.get("cohort")))
            if index is None:
                raise InputError(path, f"no cohort index for its cohort {plan.get('cohort')!r}")
            check_index(plan, index, path)
        except InputError as exc:
            audit.problem("fold plans", path, exc.problem)
            continue
        audit.ok("fold plans")
        plans[str(plan["study"])] = plan
    return plans


def audit_job(
    audit: Audit, path: Path, job: str, plan: dict | None, index: dict | None, outer: int, inner: int | None
) -> None:
    """One training / select / refit / test record against the plan, the index and its outputs."""
    rec = _read(path)
    if rec is None:
        audit.problem("jobs", path, "missing or unreadable record")
        return
    if rec.get("status") != "ok":
        audit.problem("jobs", path, f"job did not finish (status {rec.get('status')!r})")
        return
    problems = []
    if plan is not None:
        problems += _patient_problems(rec, job, plan, outer, inner)
    if index is not None:
        problems += _data_problems(rec, index)
    problems += _output_problems(rec, path.parent)
    if (rec.get("replicas") or {}).get("identical") is False:
        problems.append("the ranks ended with different parameters")
    for what in problems:
        audit.problem("jobs", path, what)
    if not problems:
        audit.ok("jobs")


def _patient_problems(rec: dict, job: str, plan: dict, outer: int, inner: int | None) -> list[str]:
    try:
        fold = fold_patients(plan, outer, inner)
    except InputError as exc:
        return [exc.problem]
    if job in ("select", "test"):
        tested = sorted(rec.get("test_patients") or [])
        return (
            []
            if tested == sorted(fold["test"])
            else [f"tested patients {tested}, the plan's test fold is {fold['test']}"]
        )
    used = rec.get("patients") or {}
    problems = [
        f"{split} patients {sorted(used.get(split) or [])} differ from the plan's {sorted(fold[split])}"
        for split in ("train", "val")
        if sorted(used.get(split) or []) != sorted(fold[split])
    ]
    leaked = set(used.get("train") or []) & (set(used.get("val") or []) | set(fold["test"]))
    if leaked:
        problems.append(f"patients {sorted(leaked)} are both in training and in validation or test")
    return problems


def _data_problems(rec: dict, index: dict) -> list[str]:
    used = (rec.get("inputs") or {}).get("shards")
    if used is None:
        return ["record names no shard digests (made before provenance was recorded?)"]
    listed = {e["image_id"]: e["sha256"] for e in index["shards"]}
    stale = sorted(i for i, sha in used.items() if listed.get(i) != sha)
    return [f"made from shard contents the index no longer lists: {stale[:5]}"] if stale else []


def _output_problems(rec: dict, directory: Path) -> list[str]:
    problems = []
    for name, info in (rec.get("outputs") or {}).items():
        path = directory / info["path"]
        if not path.is_file():
            problems.append(f"output {name} is missing")
        elif fsio.sha256_file(path) != info["sha256"]:
            problems.append(f"output {name} is not the file this job wrote (sha256 differs)")
    return problems


# ---- completeness: every job the config implies --------------------------------------------------
def audit_runs(audit: Audit, cfg: dict, indexes: dict[str, dict], plans: dict[str, dict]) -> None:
    for cohort in cfg.get("cohorts", {}):
        if cohort not in indexes:
            audit.problem("completeness", audit.site_dir / "index" / f"{cohort}.json", "cohort index missing")
    for study, spec in cfg.get("studies", {}).items():
        plan, index = plans.get(study), indexes.get(spec["cohort"])
        if plan is None:
            audit.problem("completeness", audit.site_dir / "folds" / f"{study}.json", "fold plan missing")
            continue
        runs = audit.site_dir / "runs" / study
        for outer in range(len(plan["outer"])):
            base = runs / f"outer{outer}"
            for inner in range(len(plan["outer"][outer]["inner"])):
                audit_job(audit, base / f"inner{inner}" / "record.json", "train", plan, index, outer, inner)
            audit_job(audit, base / "record.json", "select", plan, index, outer, None)
            if cfg.get("select", {}).get("refit"):
                audit_job(audit, base / "refit" / "record.json", "train", plan, index, outer, None)
                audit_job(audit, base / "refit" / "test" / "record.json", "test", plan, index, outer, None)
            if cfg["cohorts"][spec["cohort"]]["kind"] == "hsi":
                audit_job(audit, base / "maps" / "record.json", "predict-hsi", None, None, outer, None)
            elif index is not None:
                audit_slide_results(audit, base, plan, index, outer)


def audit_slide_results(audit: Audit, base: Path, plan: dict, index: dict, outer: int) -> None:
    """A WSI outer fold's slide-level results: exactly the test patients' slides, each predicted by the
    model that fold selected (the digest its select record names), each slide record as listed."""
    path = base / "wsi" / "record.json"
    rec, select = _read(path), _read(base / "record.json")
    if rec is None or rec.get("status") != "ok":
        audit.problem("jobs", path, "missing or unfinished slide-metrics record")
        return
    try:
        test = set(fold_patients(plan, outer, None)["test"])
    except InputError as exc:
        audit.problem("jobs", path, exc.problem)
        return
    expected = sorted(e["image_id"] for e in index["shards"] if e["patient_id"] in test)
    rows = rec.get("slides") or []
    problems = []
    if sorted(r["image_id"] for r in rows) != expected:
        problems.append(f"slides {sorted(r['image_id'] for r in rows)} are not the fold's test slides {expected}")
    model = (((select or {}).get("outputs") or {}).get("model.pt") or {}).get("sha256")
    for row in rows:
        if row.get("model_sha256") != model:
            problems.append(f"slide {row['image_id']} was predicted by another model than the fold's selected one")
        slide = _read(base / "wsi" / f"{row['image_id']}.record.json")
        if slide is None or (slide.get("slide") or {}).get("score") != row["score"]:
            problems.append(f"slide {row['image_id']}: its record is missing or gives another score")
    for what in problems:
        audit.problem("jobs", path, what)
    if not problems:
        audit.ok("jobs")


def audit_site(site_dir: str | Path, cfg: dict | None = None, rehash: bool = True) -> dict[str, Any]:
    """Every check on one site directory; the result document (format ``medflow-verify/1``)."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise InputError(site_dir, "results directory not found")
    cfg = cfg if cfg is not None else _site_config(site_dir)
    audit = Audit(site_dir)
    indexes = audit_indexes(audit, rehash)
    plans = audit_plans(audit, indexes)
    audit_runs(audit, cfg, indexes, plans)
    return {
        "format": VERIFY_FORMAT,
        "site_dir": site_dir.name,
        "when": now_iso(),
        "rehashed": rehash,
        "checked": dict(audit.checked),
        "problems": audit.problems,
        "status": "verified" if not audit.problems else "problems",
    }


def _site_config(site_dir: Path) -> dict:
    """The effective config the workflow wrote into the site directory (what its jobs ran with)."""
    path = site_dir / "config.yaml"
    if not path.is_file():
        raise InputError(path, "no effective config in the results directory (pass --config)")
    return config_mod.load(path)


# ---- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site_dir", help="results/<site> directory (or a copy of it anywhere)")
    p.add_argument("--config", help="config to take the expected jobs from (default: <site_dir>/config.yaml)")
    p.add_argument("--out", help="also write the result as JSON (read by `medflow summarize`)")
    p.add_argument(
        "--no-rehash", action="store_true", help="trust each shard's size and mtime instead of re-hashing it in full"
    )
    p.add_argument(
        "--record-only",
        action="store_true",
        help="exit 0 even with problems (the workflow records them; the report shows them)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config) if args.config else None
    result = audit_site(args.site_dir, cfg, rehash=not args.no_rehash)
    if args.out:
        fsio.write_json(args.out, result)
    for area, n in sorted(result["checked"].items()):
        bad = sum(p["area"] == area for p in result["problems"])
        print(f"{area:<14} {n:>6} checked  {bad:>4} problem(s)")
    for p in result["problems"]:
        print(f"medflow verify: problem: {p['file']}: {p['problem']}", file=sys.stderr)
    print(
        f"medflow verify: {args.site_dir}: {result['status']} "
        f"({sum(result['checked'].values())} checks, {len(result['problems'])} problems)"
    )
    return 0 if args.record_only or not result["problems"] else PROBLEMS_FOUND
