"""One error type for bad user input: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input (corrupt slide, malformed annotation, wrong band count, bad config...).

    The CLI prints ``<path>: <problem>`` on one line and exits 2. Raise it *before* anything is
    written, or inside ``fsio.atomic_path`` so the partial output is removed.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = " ".join(str(problem).split())  # one line, whatever a library's message held
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
