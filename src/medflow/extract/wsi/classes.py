"""Annotation groups → patch classes (config ``wsi.labels``), in one of two forms.

**Two-class form** (``labels.groups`` empty, the default): ``classes`` = [negative, positive]; polygons
of ``tumour_groups`` are the positive class, unannotated tissue the negative one, polygons of
``exclude_groups`` are cut out of the positive region, and polygons of any other group are never
sampled (a warning names them).

**Mapping form** (``labels.groups`` = {group: class}): every class of ``classes`` is the target of a
group or the ``background`` class (unannotated tissue; "" = not sampled). A group mapped to "" is
never sampled. ``exclude_groups`` still cut holes into every class's region. A polygon whose group
and ancestors (nested ASAP groups, QuPath derived classes) match no entry is an error naming the
annotation file and the group: the map must say what every annotated region is.

A polygon takes the role of the nearest group in its lineage (its own group first) that is mapped
or excluded. Where regions of several classes overlap, the class listed **later** in ``classes``
wins (list general → specific, e.g. [normal, stroma, tumour]).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import InputError
from .annotations import Polygon

EXCLUDE = -1  # role of a polygon cut out of every class region
UNSAMPLED = -2  # role of a polygon whose area is never sampled
UNKNOWN = -3  # role of a polygon no group of the map covers


@dataclass(frozen=True)
class ClassMap:
    """What each annotation group means: a class index, an exclusion, or unsampled area."""

    classes: tuple[str, ...]
    groups: dict[str, int]  # group → class index, or UNSAMPLED
    exclude: frozenset[str]
    background: int | None  # class of unannotated tissue (None: unannotated tissue is not sampled)
    strict: bool  # mapping form: an unmapped group is an error (two-class form: a warning)

    @property
    def annotated(self) -> list[int]:
        """Class indices some group maps to, in precedence order (later wins)."""
        return sorted({c for c in self.groups.values() if c >= 0})

    def role(self, polygon: Polygon) -> int:
        """Class index, EXCLUDE, UNSAMPLED or UNKNOWN: the nearest group of the lineage that the map names."""
        for group in polygon.lineage:
            if group in self.exclude:
                return EXCLUDE
            if group in self.groups:
                return self.groups[group]
        return UNKNOWN


def class_map(labels_cfg: dict, source: str | Path | None = "config") -> ClassMap:
    """The class map of ``wsi.labels``; InputError naming ``source`` and the key when it is inconsistent."""
    classes = tuple(labels_cfg["classes"])
    if len(set(classes)) != len(classes):
        raise InputError(source, f"wsi.labels.classes: duplicate class names in {list(classes)}")
    exclude = frozenset(labels_cfg["exclude_groups"])
    mapping = labels_cfg.get("groups") or {}
    if not mapping:
        if len(classes) != 2:
            raise InputError(
                source,
                f"wsi.labels.classes: {list(classes)} must be [negative, positive] unless wsi.labels.groups maps "
                "annotation groups to classes",
            )
        groups = {g: 1 for g in labels_cfg["tumour_groups"] if g not in exclude}
        return ClassMap(classes, groups, exclude, background=0, strict=False)
    background = labels_cfg.get("background") or ""
    for key, name in [
        *((f"wsi.labels.groups.{g}", c) for g, c in mapping.items()),
        ("wsi.labels.background", background),
    ]:
        if name and name not in classes:
            raise InputError(source, f"{key}: {name!r} is not one of wsi.labels.classes {list(classes)}")
    both = sorted(exclude & set(mapping))
    if both:
        raise InputError(source, f"wsi.labels.groups: {both} are also in wsi.labels.exclude_groups")
    reachable = {background} | set(mapping.values())
    unreachable = [c for c in classes if c not in reachable]
    if unreachable:
        raise InputError(
            source,
            f"wsi.labels.classes: {unreachable} is neither wsi.labels.background nor the class of a group in "
            "wsi.labels.groups, so no patch could ever have it",
        )
    groups = {g: classes.index(c) if c else UNSAMPLED for g, c in mapping.items()}
    return ClassMap(classes, groups, exclude, background=classes.index(background) if background else None, strict=True)


def check_quota(sampling_cfg: dict, classes: Iterable[str], source: str | Path | None = "config") -> None:
    """``wsi.sampling.quota`` may name only classes of ``wsi.labels.classes``."""
    unknown = sorted(set(sampling_cfg.get("quota") or {}) - set(classes))
    if unknown:
        raise InputError(source, f"wsi.sampling.quota: {unknown} not in wsi.labels.classes {list(classes)}")


def quotas(sampling_cfg: dict, classes: Iterable[str]) -> list[int]:
    """Random mode: patches wanted per class (``sampling.quota``, else ``sampling.per_class``)."""
    named = sampling_cfg.get("quota") or {}
    return [int(named.get(name, sampling_cfg["per_class"])) for name in classes]


def unknown_group_error(path: str | Path, polygon: Polygon) -> InputError:
    lineage = " → ".join(polygon.lineage) or "(no group)"
    return InputError(
        path,
        f"annotation group {polygon.group!r} (lineage {lineage}) is not in wsi.labels.groups nor "
        'wsi.labels.exclude_groups; map it to a class, or to "" to leave its area unsampled',
    )
