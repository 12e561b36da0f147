"""Atomic file output: write to a temporary name in the target directory, fsync, rename.

A reader never sees a half-written file; an existing output is replaced only on success, so a
failing job leaves the previous one byte-identical. The temporary of output ``x`` is always named
``.x.tmp-<random>``: it is removed on error, and a job killed with SIGKILL leaves one behind that the
next write of ``x`` finds and removes (``leftovers``). Each output has one writer at a time (one
Snakemake job; the results-directory lock keeps a second run out), so those leftovers can only
belong to earlier, killed runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

TMP_INFIX = ".tmp-"


def leftovers(final: str | Path) -> list[Path]:
    """Temporaries of ``final`` left by earlier runs that were killed while writing it."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(final.parent.glob(f".{glob_escape(final.name)}{TMP_INFIX}*"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def remove_leftovers(final: str | Path) -> int:
    """Remove the temporaries of earlier killed writes of ``final``; returns how many."""
    removed = 0
    for path in leftovers(final):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync and rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{TMP_INFIX}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths appear in records; keep the dependency optional here.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, dumps_json(obj))


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_json_document(path: str | Path, what: str, fmt: str | None = None) -> dict:
    """A JSON object from ``path``; InputError naming the file when it is unreadable, not an object,
    or (with ``fmt``) not of that medflow format."""
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable {what} ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(path, f"{what} is not a JSON object")
    if fmt is not None and doc.get("format") != fmt:
        raise InputError(path, f"not a medflow {what} (format {doc.get('format')!r}, expected {fmt!r})")
    return doc


def write_npy(path: str | Path, array: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.save appends ".npy" to names
        np.save(fh, array, allow_pickle=False)


def write_npz(path: str | Path, compressed: bool = False, **arrays: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez appends ".npz" to names
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()
