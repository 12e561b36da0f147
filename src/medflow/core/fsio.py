"""Atomic file output: write to a temporary name in the target directory, fsync, rename.

A reader never sees a half-written file, and a failed or killed job leaves nothing behind
(the temporary is removed on error; a SIGKILL leaves only a hidden ``.*.tmp-*`` file that the
next run of the same job overwrites). Existing outputs are replaced only on success.
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


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync and rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
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
