"""Sharded HDF5: one shard per slide or image, written atomically. See docs/architecture.md."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from .. import __version__
from . import fsio, provenance
from .errors import InputError
from .records import now_iso

SHARD_FORMAT = "medflow-shard/1"
JSON_ATTRS = ("class_names", "wavelengths", "chain", "timings_s", "inputs")


class ShardWriter:
    """Stream patches into ``final`` atomically.

    >>> with ShardWriter(path, patch_shape=(224, 224, 3), dtype="uint8", attrs={...}) as w:
    ...     w.append(patches, coords, labels)
    ...     w.attrs["timings_s"] = {...}     # may be updated until close
    On an exception inside the block the temporary file is deleted and ``final`` is untouched.
    """

    def __init__(
        self,
        final: str | Path,
        patch_shape: Sequence[int],
        dtype: str | np.dtype,
        attrs: dict[str, Any],
        chunk_patches: int = 32,
        compression: str = "none",
    ):
        self.final = Path(final)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.dtype = np.dtype(dtype)
        self.attrs = dict(attrs)
        self.chunk_patches = int(chunk_patches)
        self.compression = None if compression in (None, "none") else compression
        self.n = 0
        self._ctx: contextlib.AbstractContextManager[Path] | None = None
        self._h5: h5py.File | None = None

    def __enter__(self) -> ShardWriter:
        self._ctx = fsio.atomic_path(self.final)
        tmp = self._ctx.__enter__()
        self._h5 = h5py.File(tmp, "w", libver="latest")
        c = self.chunk_patches
        opts = {"compression": self.compression} if self.compression else {}
        self._patches = self._h5.create_dataset(
            "patches",
            shape=(0, *self.patch_shape),
            maxshape=(None, *self.patch_shape),
            dtype=self.dtype,
            chunks=(c, *self.patch_shape),
            **opts,
        )
        self._coords = self._h5.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(max(c, 1024), 2)
        )
        self._labels = self._h5.create_dataset(
            "labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(max(c, 1024),)
        )
        return self

    def append(self, patches: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> None:
        patches = np.asarray(patches)
        k = len(patches)
        if patches.shape[1:] != self.patch_shape or len(coords) != k or len(labels) != k:
            raise ValueError(
                f"batch shapes {patches.shape}, {np.shape(coords)}, {np.shape(labels)} "
                f"do not match patch shape {self.patch_shape}"
            )
        if k == 0:
            return
        lo, hi = self.n, self.n + k
        for ds in (self._patches, self._coords, self._labels):
            ds.resize(hi, axis=0)
        self._patches[lo:hi] = patches.astype(self.dtype, copy=False)
        self._coords[lo:hi] = np.asarray(coords, dtype=np.int64).reshape(k, 2)
        self._labels[lo:hi] = np.asarray(labels, dtype=np.int64)
        self.n = hi

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._h5 is not None and self._ctx is not None
        try:
            if exc_type is None:
                attrs = {
                    "format": SHARD_FORMAT,
                    "medflow_version": __version__,
                    "git_commit": provenance.git_commit(),
                    "n_patches": self.n,
                    "created": now_iso(),
                    **self.attrs,
                }
                for key, value in attrs.items():
                    self._h5.attrs[key] = _attr_value(key, value)
        finally:
            self._h5.close()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def _attr_value(key: str, value: Any) -> Any:
    if key in JSON_ATTRS or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=fsio._json_default)
    if value is None:
        return ""
    return value


def read_attrs(h5: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in h5.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def open_shard(path: str | Path) -> h5py.File:
    """Open a shard read-only, checking its format; InputError names the file otherwise."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 shard ({exc})") from None
    fmt = h5.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != SHARD_FORMAT or not {"patches", "coords", "labels"} <= set(h5.keys()):
        h5.close()
        raise InputError(path, f"not a medflow shard (format {fmt!r})")
    return h5
