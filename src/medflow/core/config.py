"""Load and validate the workflow config exactly as the Snakefile does (same schema, same defaults)."""

from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@lru_cache(maxsize=1)
def schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _resolve_local_ref(sub: dict) -> dict:
    ref = sub.get("$ref", "")
    if ref.startswith("#/definitions/"):
        return schema()["definitions"][ref.rsplit("/", 1)[1]]
    return sub


def _validator_with_defaults() -> type:
    """Draft 2020-12 validator (as Snakemake 9 uses) that fills ``default`` values, like ``snakemake.utils.validate``."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                sub = _resolve_local_ref(sub)
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def validate(cfg: dict, source: str | Path | None = "config") -> dict:
    """Validate ``cfg`` in place, filling defaults; raise InputError naming the offending key."""
    validator = _validator_with_defaults()(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(source, f"invalid config at '{where}': {err.message}")
    # A second pass: defaults filled inside freshly defaulted objects need validating too.
    for err in validator.iter_errors(cfg):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(source, f"invalid config at '{where}': {err.message}")
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error, not "last one wins"."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | Path) -> Any:
    """A YAML document read strictly (duplicate keys rejected); InputError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path) as fh:
            return yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable ({exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {' '.join(str(exc).split())}") from None


def load(path: str | Path) -> dict:
    """Read a YAML config file strictly, validate it and fill defaults."""
    cfg = read_yaml(path) or {}
    if not isinstance(cfg, dict):
        raise InputError(path, "config must be a mapping")
    validate(cfg, path)
    check_studies(cfg, path, require_cohorts=False)
    return cfg


def check_studies(cfg: dict, source: str | Path = "config", require_cohorts: bool = True) -> None:
    """What the schema cannot say about studies: the cohort exists (when ``require_cohorts``: the workflow
    needs every study's cohort, a single command only the ones it uses) and the positive class is one of
    its classes (a misspelled class would silently leave sensitivity and specificity undefined)."""
    for name, spec in cfg.get("studies", {}).items():
        cohort = cfg.get("cohorts", {}).get(spec["cohort"])
        if cohort is None:
            if require_cohorts:
                raise InputError(
                    source,
                    f"studies.{name}.cohort: {spec['cohort']!r} is not a cohort "
                    f"(cohorts: {sorted(cfg.get('cohorts', {}))})",
                )
            continue
        classes = class_names(cfg, cohort["kind"])
        if spec["positive_class"] not in classes:
            raise InputError(
                source,
                f"studies.{name}.positive_class: {spec['positive_class']!r} is not a class of "
                f"cohort {spec['cohort']!r} ({cohort['kind']} classes: {classes})",
            )


def class_names(cfg: dict, kind: str) -> list[str]:
    """The classes shards of ``kind`` are labelled with."""
    return list(cfg["wsi"]["labels"]["classes"] if kind == "wsi" else cfg["hsi"]["class_names"])


def study(cfg: dict, name: str, source: str | Path) -> dict:
    """The config of study ``name``; InputError naming ``source`` (the config file) when it is not defined."""
    studies = cfg.get("studies", {})
    if name not in studies:
        raise InputError(source, f"study {name!r} is not in the config (studies: {sorted(studies)})")
    return studies[name]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def section_hash(cfg: dict, *sections: str) -> str:
    """Hash of the config sections a stage reads (plus the seed), so unrelated edits don't invalidate it.

    A section name may be dotted (``studies.wsi_demo``).
    """
    picked: dict[str, Any] = {"seed": cfg.get("seed")}
    for name in sections:
        node: Any = cfg
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[name] = node
    return hashlib.sha256(canonical_json(picked).encode()).hexdigest()[:16]
