"""Patient-level nested cross-validation fold plans (`medflow plan-folds`).

Outer k-fold (or leave-one-patient-out) over the patients of a cohort index, and an inner k-fold
inside every outer training set. Whole patients are assigned to folds — patches of one patient
are strongly correlated and must never sit on both sides of a split.

Two assignment objectives (``folds.balance``):
- ``stratified``: per-label patch shares of every fold approach 1/k (as far as patient groups
  allow), with the patient count per fold kept even;
- ``balanced``: the proportion-and-diversity balanced partitioning — both the share of patches
  and the share of patients per fold approach 1/k, with the per-label shares as a secondary term.
Both start from a seeded greedy assignment (largest patients first) and improve it by local
search (moves and swaps of patients between folds). The achieved shares and their deviation from
the target are written into the plan. Same seed and index → byte-identical plan.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import config as config_mod
from ..core import fsio
from ..core.errors import InputError
from ..core.index import load_index
from ..core.seeds import stream_seed

PLAN_FORMAT = "medflow-folds/1"
# Objective weights: (patch share, patient share, per-label shares).
WEIGHTS = {"stratified": (0.0, 0.25, 1.0), "balanced": (1.0, 1.0, 0.25)}
MAX_SWAP_PATIENTS = 400  # pairwise swaps are O(n²) per pass; moves alone beyond this size


# ---- patients and their patch counts ----------------------------------------------------------
def patient_counts(index: dict) -> tuple[list[str], np.ndarray, list[str]]:
    """Sorted patient ids and their (P, C) patch counts per class, from the cohort index."""
    class_names = list(index["class_names"])
    table: dict[str, np.ndarray] = {}
    for shard in index["shards"]:
        row = table.setdefault(str(shard["patient_id"]), np.zeros(len(class_names), dtype=np.int64))
        row += np.array([int(shard["counts"].get(c, 0)) for c in class_names], dtype=np.int64)
    patients = sorted(table)
    counts = np.stack([table[p] for p in patients]) if patients else np.zeros((0, len(class_names)), np.int64)
    return patients, counts, class_names


def index_digest(index: dict) -> str:
    """Hash of what the plan depends on: patients, their images and patch counts per class
    (not shard checksums: re-extracting identical patches must not invalidate a plan)."""
    rows = sorted((str(s["patient_id"]), str(s["image_id"]), sorted(s["counts"].items())) for s in index["shards"])
    return hashlib.sha256(config_mod.canonical_json(rows).encode()).hexdigest()[:16]


# ---- assignment -------------------------------------------------------------------------------
class _Objective:
    """Sum over folds of squared deviations of the fold shares from 1/k (weighted terms)."""

    def __init__(self, counts: np.ndarray, k: int, balance: str):
        self.k = k
        n_patients = max(len(counts), 1)
        label_tot = counts.sum(axis=0).astype(np.float64)
        # Feature columns: patches, patients, each label; normalised to shares of the total.
        feats = np.column_stack([counts.sum(axis=1), np.ones(len(counts)), counts]).astype(np.float64)
        totals = np.r_[max(feats[:, 0].sum(), 1.0), n_patients, np.where(label_tot > 0, label_tot, 1.0)]
        self.share = feats / totals
        w_patch, w_patient, w_label = WEIGHTS[balance]
        n_labels = counts.shape[1]
        present = (label_tot > 0).astype(np.float64)
        label_w = w_label * present / max(present.sum(), 1.0)
        self.weights = np.r_[w_patch, w_patient, label_w] if n_labels else np.r_[w_patch, w_patient]

    def fold_cost(self, fold_share: np.ndarray) -> np.ndarray:
        """Cost per fold for (..., F) share rows."""
        return ((fold_share - 1.0 / self.k) ** 2 * self.weights).sum(axis=-1)


def assign_groups(counts: np.ndarray, k: int, balance: str, seed: int) -> np.ndarray:
    """Fold number (0..k-1) for every patient row of ``counts``; every fold gets ≥ 1 patient."""
    n = len(counts)
    if n < k:
        raise ValueError(f"{n} patients for {k} folds")
    rng = np.random.default_rng(seed)
    obj = _Objective(counts, k, balance)
    sizes = counts.sum(axis=1)
    # Largest patients first (hardest to place); random order among equal sizes.
    order = np.lexsort((rng.permutation(n), -sizes))
    fold = np.full(n, -1, dtype=np.int64)
    fold_share = np.zeros((k, obj.share.shape[1]))
    for rank, p in enumerate(order):
        remaining = n - rank
        empty = np.flatnonzero(np.bincount(fold[fold >= 0], minlength=k) == 0)
        candidates = empty if len(empty) >= remaining else np.arange(k)
        delta = obj.fold_cost(fold_share[candidates] + obj.share[p]) - obj.fold_cost(fold_share[candidates])
        # Ties broken by a seeded permutation of the folds, so equal folds are chosen at random.
        tie = rng.permutation(len(candidates))
        best = candidates[np.lexsort((tie, np.round(delta, 12)))[0]]
        fold[p] = best
        fold_share[best] += obj.share[p]
    return _local_search(fold, fold_share, obj, rng)


def _local_search(
    fold: np.ndarray, fold_share: np.ndarray, obj: _Objective, rng: np.random.Generator, max_passes: int = 50
) -> np.ndarray:
    """Improve by single-patient moves and pairwise swaps until no step lowers the objective."""
    n = len(fold)
    eps = 1e-12
    for _ in range(max_passes):
        improved = False
        for p in rng.permutation(n):
            src = fold[p]
            if np.sum(fold == src) <= 1:
                continue  # keep every fold non-empty
            base = obj.fold_cost(fold_share[src]) + obj.fold_cost(fold_share)
            gain = base - obj.fold_cost(fold_share[src] - obj.share[p]) - obj.fold_cost(fold_share + obj.share[p])
            gain[src] = 0.0
            dst = int(np.argmax(gain))
            if gain[dst] > eps:
                fold_share[src] -= obj.share[p]
                fold_share[dst] += obj.share[p]
                fold[p] = dst
                improved = True
        if n <= MAX_SWAP_PATIENTS:
            improved |= _swap_pass(fold, fold_share, obj, rng, eps)
        if not improved:
            break
    return fold


def _swap_pass(fold: np.ndarray, fold_share: np.ndarray, obj: _Objective, rng: np.random.Generator, eps: float) -> bool:
    improved = False
    for p in rng.permutation(len(fold)):
        a = fold[p]
        others = np.flatnonzero(fold != a)
        if not len(others):
            continue
        b = fold[others]
        diff = obj.share[others] - obj.share[p]  # what fold a gains, fold b loses
        before = obj.fold_cost(fold_share[a]) + obj.fold_cost(fold_share[b])
        after = obj.fold_cost(fold_share[a] + diff) + obj.fold_cost(fold_share[b] - diff)
        gain = before - after
        j = int(np.argmax(gain))
        if gain[j] > eps:
            q, bq = others[j], b[j]
            fold_share[a] += diff[j]
            fold_share[bq] -= diff[j]
            fold[p], fold[q] = bq, a
            improved = True
    return improved


# ---- shares and deviation ---------------------------------------------------------------------
def shares(
    members: Sequence[str], pool: Sequence[str], table: dict[str, np.ndarray], class_names: Sequence[str]
) -> dict[str, Any]:
    """Share of the pool's patches, patients and per-label patches that ``members`` hold."""
    pool_counts = np.sum([table[p] for p in pool], axis=0) if pool else np.zeros(len(class_names))
    mem_counts = np.sum([table[p] for p in members], axis=0) if members else np.zeros(len(class_names))
    total = float(pool_counts.sum())
    return {
        "patients": len(members) / len(pool) if pool else 0.0,
        "patches": float(mem_counts.sum()) / total if total else 0.0,
        "labels": {
            c: (float(mem_counts[i]) / float(pool_counts[i]) if pool_counts[i] else None)
            for i, c in enumerate(class_names)
        },
        "n_patients": len(members),
        "n_patches": int(mem_counts.sum()),
    }


def _deviation(share: dict[str, Any], target: float) -> dict[str, Any]:
    return {
        "patients": round(share["patients"] - target, 6),
        "patches": round(share["patches"] - target, 6),
        "labels": {c: (None if v is None else round(v - target, 6)) for c, v in share["labels"].items()},
    }


def _max_abs(devs: Iterable[dict[str, Any]]) -> dict[str, float]:
    devs = list(devs)
    label_vals = [abs(v) for d in devs for v in d["labels"].values() if v is not None]
    return {
        "patients": max((abs(d["patients"]) for d in devs), default=0.0),
        "patches": max((abs(d["patches"]) for d in devs), default=0.0),
        "labels": max(label_vals, default=0.0),
    }


def _round_shares(s: dict[str, Any]) -> dict[str, Any]:
    return {
        **s,
        "patients": round(s["patients"], 6),
        "patches": round(s["patches"], 6),
        "labels": {c: (None if v is None else round(v, 6)) for c, v in s["labels"].items()},
    }


# ---- feasibility ------------------------------------------------------------------------------
def min_patients(folds_cfg: dict) -> int:
    """The fewest patients the fold plan can be made from (each outer training set must still fill the
    inner folds; k-fold outer test folds hold ⌈n/k⌉ patients at best)."""
    k_inner = int(folds_cfg["inner"])
    if folds_cfg["strategy"] == "lopo":
        return max(2, k_inner + 1)
    k_outer = int(folds_cfg["outer"])
    n = k_outer
    while n - math.ceil(n / k_outer) < k_inner:
        n += 1
    return n


def check_patients(n: int, folds_cfg: dict, cohort: str, source: str | Path = "config") -> None:
    """InputError naming the folds keys when ``n`` patients are too few for the plan."""
    need = min_patients(folds_cfg)
    if n < need:
        plan = "leave-one-patient-out" if folds_cfg["strategy"] == "lopo" else f"{folds_cfg['outer']} outer folds"
        raise InputError(
            source,
            f"folds.outer/folds.inner: {plan} × {folds_cfg['inner']} inner folds need at least "
            f"{need} patients; cohort {cohort!r} has {n} (lower folds.outer or folds.inner)",
        )


# ---- plan -------------------------------------------------------------------------------------
def _split(patients: list[str], counts: np.ndarray, k: int, balance: str, seed: int) -> list[list[str]]:
    fold = assign_groups(counts, k, balance, seed)
    return [sorted(p for p, f in zip(patients, fold) if f == i) for i in range(k)]


def make_plan(index: dict, cfg: dict, study: str, source: str | Path | None = None) -> dict[str, Any]:
    """The nested fold plan for ``study`` over the patients of ``index`` (see docs/architecture.md)."""
    folds_cfg = cfg.get("folds", {})
    strategy = folds_cfg.get("strategy", "kfold")
    balance = folds_cfg.get("balance", "stratified")
    k_outer, k_inner = int(folds_cfg.get("outer", 5)), int(folds_cfg.get("inner", 5))
    seed = int(cfg.get("seed", 0))
    where = source if source is not None else f"cohort index {index.get('cohort')!r}"
    study_cfg = cfg.get("studies", {}).get(study)
    if study_cfg and study_cfg.get("cohort") not in (None, index.get("cohort")):
        raise InputError(
            where, f"study {study!r} uses cohort {study_cfg['cohort']!r}, the index is cohort {index.get('cohort')!r}"
        )

    patients, counts, class_names = patient_counts(index)
    table = dict(zip(patients, counts))
    n = len(patients)
    if strategy == "lopo":
        k_outer = n
        if n < 2:
            raise InputError(where, f"leave-one-patient-out needs at least 2 patients, the index has {n}")
        outer_test = [[p] for p in patients]
    else:
        if n < k_outer:
            raise InputError(
                where,
                f"{n} patients cannot fill {k_outer} outer folds "
                f"(folds.outer = {k_outer}; lower it or use more patients)",
            )
        outer_test = _split(patients, counts, k_outer, balance, stream_seed(seed, study, "outer"))
    # Every outer training set must hold enough patients for the inner folds.
    min_train = n - max(len(t) for t in outer_test)
    if min_train < k_inner:
        raise InputError(
            where,
            f"an outer training set has {min_train} patients, too few for "
            f"{k_inner} inner folds (folds.inner = {k_inner})",
        )

    outer: list[dict[str, Any]] = []
    for i, test in enumerate(outer_test):
        test_set = set(test)
        train = [p for p in patients if p not in test_set]
        train_counts = np.stack([table[p] for p in train])
        inner_val = _split(train, train_counts, k_inner, balance, stream_seed(seed, study, "inner", i))
        inner: list[dict[str, Any]] = []
        for j, val in enumerate(inner_val):
            val_set = set(val)
            inner.append(
                {
                    "index": j,
                    "train_patients": [p for p in train if p not in val_set],
                    "val_patients": val,
                    "shares": _round_shares(shares(val, train, table, class_names)),
                }
            )
        outer.append(
            {
                "index": i,
                "test_patients": sorted(test),
                "train_patients": train,
                "inner": inner,
                "shares": _round_shares(shares(test, patients, table, class_names)),
            }
        )

    target_outer = 1.0 / k_outer
    target_inner = 1.0 / k_inner
    outer_dev = [_deviation(o["shares"], target_outer) for o in outer]
    inner_dev = [[_deviation(f["shares"], target_inner) for f in o["inner"]] for o in outer]
    plan = {
        "format": PLAN_FORMAT,
        "study": study,
        "cohort": index.get("cohort"),
        "seed": seed,
        "strategy": strategy,
        "balance": balance,
        "k_outer": k_outer,
        "k_inner": k_inner,
        "class_names": class_names,
        "patients": patients,
        "patient_patches": {p: {c: int(v) for c, v in zip(class_names, table[p])} for p in patients},
        "outer": outer,
        "deviation": {
            "target_outer": round(target_outer, 6),
            "target_inner": round(target_inner, 6),
            "outer": outer_dev,
            "inner": inner_dev,
            "max_abs_outer": _max_abs(outer_dev),
            "max_abs_inner": _max_abs(d for fold in inner_dev for d in fold),
        },
        "index_digest": index_digest(index),
        "config_hash": config_mod.section_hash(cfg, "folds"),
    }
    plan["warnings"] = class_warnings(plan, table)
    check_plan(plan, where)
    return plan


def class_warnings(plan: dict[str, Any], table: dict[str, np.ndarray]) -> list[str]:
    """What makes a plan's results misleading without making it impossible: a cohort with one class
    (accuracy is then trivially 1.0), or a class missing from a training, validation or test split."""
    names = plan["class_names"]

    def absent(members: Sequence[str]) -> list[str]:
        total = np.sum([table[p] for p in members], axis=0) if members else np.zeros(len(names))
        return [c for c, v in zip(names, total) if v == 0]

    present = [c for c in names if c not in absent(plan["patients"])]
    warnings = []
    if len(present) < 2:
        warnings.append(f"single-class cohort: only {present} has patches; accuracy is meaningless")
    for o in plan["outer"]:
        splits = [
            (f"outer {o['index']} test", o["test_patients"]),
            (f"outer {o['index']} training", o["train_patients"]),
        ]
        for f in o["inner"]:
            splits += [
                (f"outer {o['index']} inner {f['index']} training", f["train_patients"]),
                (f"outer {o['index']} inner {f['index']} validation", f["val_patients"]),
            ]
        for name, members in splits:
            missing = [c for c in absent(members) if c in present]
            if missing:
                warnings.append(f"{name} split has no patch of class(es) {missing}")
    return warnings


def check_plan(plan: dict, source: str | Path | None) -> None:
    """Raise InputError unless every split is disjoint by patient and covers its pool exactly."""
    if plan.get("format") != PLAN_FORMAT:
        raise InputError(source, f"not a medflow fold plan (format {plan.get('format')!r})")
    try:
        everyone = set(plan["patients"])
        seen_test: set[str] = set()
        for o in plan["outer"]:
            test, train = set(o["test_patients"]), set(o["train_patients"])
            _disjoint(source, f"outer {o['index']}: test/train", test, train)
            if test | train != everyone:
                raise InputError(source, f"outer {o['index']}: test ∪ train is not the cohort's patients")
            if test & seen_test:
                raise InputError(
                    source,
                    f"outer {o['index']}: test patients {sorted(test & seen_test)} are in another outer test fold",
                )
            seen_test |= test
            seen_val: set[str] = set()
            for f in o["inner"]:
                i_train, i_val = set(f["train_patients"]), set(f["val_patients"])
                name = f"outer {o['index']} inner {f['index']}"
                _disjoint(source, f"{name}: val/train", i_val, i_train)
                _disjoint(source, f"{name}: val/outer test", i_val, test)
                _disjoint(source, f"{name}: train/outer test", i_train, test)
                if i_train | i_val != train:
                    raise InputError(source, f"{name}: train ∪ val is not the outer training set")
                if not i_val or not i_train:
                    raise InputError(source, f"{name}: empty split")
                _disjoint(source, f"{name}: val in another inner fold", i_val, seen_val)
                seen_val |= i_val
        if seen_test != everyone:
            raise InputError(source, f"patients {sorted(everyone - seen_test)} are in no outer test fold")
    except (KeyError, TypeError) as exc:
        raise InputError(source, f"malformed fold plan ({exc!r})") from None


def _disjoint(source: Any, what: str, a: set[str], b: set[str]) -> None:
    common = a & b
    if common:
        raise InputError(source, f"{what} share patients {sorted(common)[:5]}")


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read a fold plan and re-check that every split is disjoint by patient."""
    plan = fsio.read_json_document(path, "fold plan")
    check_plan(plan, path)
    return plan


def check_index(plan: dict, index: dict, source: str | Path | None = None) -> None:
    """Raise InputError unless ``plan`` was made from this cohort index (same patients, images and
    counts): a stale plan would silently train on splits of another cohort state."""
    if plan.get("index_digest") != index_digest(index):
        where = source if source is not None else f"cohort index {index.get('cohort')!r}"
        raise InputError(
            where,
            f"the fold plan of study {plan.get('study')!r} was made from a different "
            f"cohort index (digest {plan.get('index_digest')} ≠ {index_digest(index)}); "
            "rerun plan-folds",
        )


def fold_patients(plan: dict, outer: int, inner: int | None) -> dict[str, list[str]]:
    """Patients of one job: inner=None → the whole outer training set, no validation."""
    if not 0 <= outer < len(plan["outer"]):
        raise InputError(None, f"outer fold {outer} not in the plan (0..{len(plan['outer']) - 1})")
    o = plan["outer"][outer]
    if inner is None:
        return {"train": list(o["train_patients"]), "val": [], "test": list(o["test_patients"])}
    if not 0 <= inner < len(o["inner"]):
        raise InputError(None, f"inner fold {inner} not in outer fold {outer} (0..{len(o['inner']) - 1})")
    f = o["inner"][inner]
    return {"train": list(f["train_patients"]), "val": list(f["val_patients"]), "test": list(o["test_patients"])}


def summary_line(plan: dict) -> str:
    dev = plan["deviation"]["max_abs_outer"]
    return (
        f"{plan['strategy']} {plan['k_outer']}×{plan['k_inner']} ({plan['balance']}) over "
        f"{len(plan['patients'])} patients; max |share − 1/k| outer: patches {dev['patches']:.3f}, "
        f"patients {dev['patients']:.3f}, labels {dev['labels']:.3f}"
    )


# ---- CLI: medflow plan-folds ------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--index", required=True, help="cohort index JSON (medflow index)")
    p.add_argument("--out", required=True, help="fold plan JSON to write")


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    config_mod.study(cfg, args.study, args.config)
    index = load_index(args.index)
    plan = make_plan(index, cfg, args.study, source=args.index)
    fsio.write_json(args.out, plan)
    print(f"folds {args.out}: {summary_line(plan)}")
    for warning in plan["warnings"]:
        print(f"medflow plan-folds: warning: {args.out}: {warning}")
    return 0
