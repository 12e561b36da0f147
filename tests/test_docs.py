"""The docs name only what exists: every `medflow.x.y` they cite imports, every repository path they cite is there."""

from __future__ import annotations

import importlib
import re

import pytest

from conftest import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
NAME = re.compile(r"(?<![\w./-])medflow(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FILE_NAMES = {"medflow.sif", "medflow.def"}  # container image files, not modules
REPO_PATH = re.compile(r"`((?:src|tests|docs|workflow|slurm|containers|benchmarks|\.ci)/[A-Za-z0-9_./-]+)`")


def _resolve(name: str) -> None:
    """Import the longest importable prefix of ``name`` and look the rest up as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    raise ModuleNotFoundError(name)


def _cited(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for match in pattern.finditer(doc.read_text()):
            found.append((doc.name, match.group(1) if pattern.groups else match.group(0)))
    return sorted(set(found))


@pytest.mark.parametrize("doc, name", [c for c in _cited(NAME) if c[1] not in FILE_NAMES])
def test_cited_name_exists(doc: str, name: str) -> None:
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{doc} cites {name}, which does not exist ({exc})")


@pytest.mark.parametrize("doc, path", _cited(REPO_PATH))
def test_cited_repository_path_exists(doc: str, path: str) -> None:
    assert (ROOT / path.split("#")[0]).exists(), f"{doc} cites {path}, which is not in the repository"


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md's tree names each module of src/medflow (one line per module)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = text[text.index("src/medflow/") : text.index("**Layers**")]
    modules = sorted(p.name for p in (ROOT / "src" / "medflow").rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if not re.search(rf"^\s+{re.escape(m)}\s", tree, re.M)]
    assert not missing, f"modules missing from the tree in docs/architecture.md: {missing}"
