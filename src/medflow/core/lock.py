"""A lock on a site's results directory, held by the one workflow run that writes it.

Snakemake's own lock is per working directory; two runs started from different directories (or
hosts) on one results directory would run the same jobs at once and train from each other's
checkpoints. This lock lives in the results directory itself: a directory ``.medflow.lock`` (mkdir
is atomic on every file system, NFS included) holding ``owner.json`` (host, pid, start time, working
directory, a random token), whose modification time the holder refreshes every ``HEARTBEAT_S``.

A second run stops at once naming the holder. A lock is stale, and is taken over, when its holder
ran on this host and its process is gone, or when its heartbeat is older than ``STALE_AFTER_S``
(a holder on another host that died); take-over renames the stale lock away first, so of two runs
taking over at once exactly one wins the fresh ``mkdir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsio
from .errors import InputError

LOCK_NAME = ".medflow.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
_OWNER = "owner.json"


class LockHeld(InputError):
    """Another live run holds the results directory."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _host() -> str:
    return socket.gethostname()


@dataclass
class ResultsLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) gives it up."""

    directory: Path
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def owner_file(self) -> Path:
        return self.directory / _OWNER

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.owner_file)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="medflow-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        owner = _read_owner(self.directory)
        if owner.get("token") == self.token:  # never remove a lock someone else took over
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ResultsLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(directory: Path) -> dict[str, Any]:
    try:
        owner = json.loads((directory / _OWNER).read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(owner: dict[str, Any]) -> str:
    return (
        f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}, "
        f"working directory {owner.get('cwd', '?')}"
    )


def stale_reason(directory: Path, now: float | None = None) -> str | None:
    """Why the lock in ``directory`` is stale, or None while its holder is alive."""
    owner = _read_owner(directory)
    if owner.get("host") == _host() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
        return f"its process {owner['pid']} on this host is gone"
    try:
        beat = (directory / _OWNER).stat().st_mtime if owner else directory.stat().st_mtime
    except FileNotFoundError:
        return "it has no owner"
    age = (time.time() if now is None else now) - beat
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s)"
    return None


def acquire(results_dir: str | Path, purpose: str = "workflow run") -> ResultsLock:
    """Take the lock of ``results_dir`` (created if needed) or raise LockHeld naming its holder."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    directory = results_dir / LOCK_NAME
    token = secrets.token_hex(8)
    for _ in range(3):
        try:
            directory.mkdir()
        except FileExistsError:
            time.sleep(0.2)  # the holder may be between mkdir and owner.json
            reason = stale_reason(directory)
            if reason is None:
                owner = _read_owner(directory)
                raise LockHeld(
                    results_dir,
                    f"another medflow run holds this results directory ({describe(owner)}); "
                    f"wait for it, or if it is gone remove {directory}",
                ) from None
            print(f"medflow: taking over the stale lock of {results_dir} ({reason})", flush=True)
            with contextlib.suppress(FileNotFoundError, OSError):
                directory.rename(results_dir / f"{LOCK_NAME}.stale-{token}")
                shutil.rmtree(results_dir / f"{LOCK_NAME}.stale-{token}", ignore_errors=True)
            continue
        owner = {
            "host": _host(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cwd": os.getcwd(),
            "token": token,
            "purpose": purpose,
        }
        fsio.write_json(directory / _OWNER, owner)
        lock = ResultsLock(directory, token)
        lock.start_heartbeat()
        return lock
    raise LockHeld(results_dir, f"could not take the lock {directory} (contended)")
