"""MLflow runs of training jobs (optional: ``tracking.mlflow.uri``; needs the ``mlflow-skinny`` package).

The run tree, in experiment ``tracking.mlflow.experiment`` (default ``study_name``): a study run
``<study>`` → an outer run ``<study>/outer<i>`` → one run per training job ``<study>/outer<i>/inner<j>``
(``…/refit`` without ``--inner``), nested through MLflow's ``mlflow.parentRunId`` tag. Each site has
its own tree (the key includes the site), so sites sharing a server do not mix.

**Parents are shared by concurrent jobs.** Every fold job of a study starts at about the same time on a
cluster and needs the same parents. A parent is found by its tag ``medflow.key_id`` (a hash of
``site/study[/outer]``) or created:

- local file stores (``file:`` URIs, plain paths): every MLflow call of a job runs under an exclusive
  lock file (``flock``) in the store directory, so exactly one job creates each parent, and no job
  reads a run's files while another writes them (MLflow's file store is not safe for that: a search
  meeting a metric file being written fails with "Metric … is malformed");
- servers and databases (no lock spans machines): find, else create and search again, taking the
  canonical run (oldest start time, then run id). When two jobs raced, `converge` at the end of every
  job points the fold and outer runs at the canonical parents and deletes duplicate parents that have
  no children left, so the tree converges to one study run and one run per outer fold.

Parents are created FINISHED: no single job owns their end.

**The fold run**: tags site, host, SLURM job id, git commit (``mlflow.source.git.commit``), config hash,
run directory; params: the flattened study, launch and fold settings; metrics per epoch (step =
epoch); at the end the exported model's validation metrics (``model/val_*``) and ``model.pt`` and
``curves.csv`` as artefacts. A resumed job (from a checkpoint) continues its run — found by key and
checkpoint identity — and adds only the epochs the run lacks (from the checkpoint's curves); a fresh
start creates a new run and marks unfinished older runs of the same job KILLED.

**It never breaks or slows a job**: every call runs in one background thread, in order; the first
error prints one warning line and drops MLflow for the rest of the job; at the end the job waits at
most ``tracking.mlflow.timeout_s`` for pending calls (uploads). HTTP retries are shortened
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` unless set), so a server
that is down is reported within seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import queue
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_TAG = "medflow.key_id"
PARENT_TAG = "mlflow.parentRunId"
LOCK_NAME = ".medflow-run-tree.lock"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class FoldRunSpec:
    """What identifies and describes one training job's run."""

    uri: str
    experiment: str
    site: str
    study: str
    outer: int
    fold: str  # "inner<j>" | "refit"
    identity: str  # hash of the checkpoint identity: same job, same config
    resumed: bool
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def study_key(self) -> str:
        return f"{self.site}/{self.study}"

    @property
    def outer_key(self) -> str:
        return f"{self.study_key}/outer{self.outer}"

    @property
    def fold_key(self) -> str:
        return f"{self.outer_key}/{self.fold}"

    @property
    def run_name(self) -> str:
        return f"{self.study}/outer{self.outer}/{self.fold}"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def local_store(uri: str) -> Path | None:
    """The directory of a local file store (``file:`` URI or plain path), else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


def client_for(uri: str) -> Any:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if local_store(uri) is not None:
        # MLflow 3 asks file-store users to opt in; a `file:` URI in the config is that choice.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient  # optional dependency, imported in the background thread

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock over a local file store (one per store; not re-entrant); nothing for other stores."""
    root = local_store(uri)
    if root is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- the tree -------------------------------------------------------------------------------------------
def ensure_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException:  # created by a concurrent job meanwhile (unique name on servers)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def find_runs(client: Any, experiment_id: str, key: str, extra: str = "") -> list[Any]:
    flt = f"tags.`{KEY_TAG}` = '{key_id(key)}'" + (f" and {extra}" if extra else "")
    return list(client.search_runs([experiment_id], filter_string=flt, max_results=1000))


def canonical(runs: list[Any]) -> Any:
    """The run concurrent creators agree on: the oldest (start time, then run id)."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def ensure_parent(
    client: Any, experiment_id: str, key: str, name: str, parent_id: str | None, tags: Mapping[str, str]
) -> str:
    """The run id of the parent ``key``, created (FINISHED) when no job made it yet."""
    runs = find_runs(client, experiment_id, key)
    if not runs:
        all_tags = {**tags, KEY_TAG: key_id(key), "medflow.key": key}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = client.create_run(experiment_id, tags=all_tags, run_name=name)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs = find_runs(client, experiment_id, key) or [run]
    return str(canonical(runs).info.run_id)


def _has_children(client: Any, experiment_id: str, run_id: str) -> bool:
    return bool(client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=1))


def converge(client: Any, experiment_id: str, spec: FoldRunSpec, run_id: str) -> tuple[str, str]:
    """Point the fold run and its outer run at the canonical parents; delete childless duplicates.
    Returns (study run id, outer run id)."""
    studies, outers = find_runs(client, experiment_id, spec.study_key), find_runs(client, experiment_id, spec.outer_key)
    study, outer = canonical(studies), canonical(outers)
    if outer.data.tags.get(PARENT_TAG) != study.info.run_id:
        client.set_tag(outer.info.run_id, PARENT_TAG, study.info.run_id)
    client.set_tag(run_id, PARENT_TAG, outer.info.run_id)
    for dup in [r for r in outers if r is not outer] + [r for r in studies if r is not study]:
        if not _has_children(client, experiment_id, dup.info.run_id):
            client.delete_run(dup.info.run_id)
    return str(study.info.run_id), str(outer.info.run_id)


def open_tree(client: Any, spec: FoldRunSpec) -> dict[str, Any]:
    """Experiment, parents and the fold run (new, or the resumed job's own); returns their ids and
    the epochs the fold run already holds. Callers hold `store_lock`."""
    common = {"medflow.site": spec.site, "medflow.study": spec.study}
    experiment_id = ensure_experiment(client, spec.experiment)
    study_id = ensure_parent(
        client, experiment_id, spec.study_key, spec.study, None, {**common, "medflow.level": "study"}
    )
    outer_id = ensure_parent(
        client,
        experiment_id,
        spec.outer_key,
        f"{spec.study}/outer{spec.outer}",
        study_id,
        {**common, "medflow.level": "outer", "medflow.outer": str(spec.outer)},
    )
    run_id, logged = _fold_run(client, experiment_id, spec, outer_id)
    return {
        "experiment_id": experiment_id,
        "study_run_id": study_id,
        "outer_run_id": outer_id,
        "run_id": run_id,
        "logged": logged,
    }


def _fold_run(client: Any, experiment_id: str, spec: FoldRunSpec, outer_id: str) -> tuple[str, set[int]]:
    from mlflow.entities import Param, RunTag

    same_job = find_runs(client, experiment_id, spec.fold_key, f"tags.`medflow.identity` = '{spec.identity}'")
    tags = {**spec.tags, PARENT_TAG: outer_id, "medflow.level": "fold", "medflow.identity": spec.identity}
    if spec.resumed and same_job:
        run_id = str(max(same_job, key=lambda r: r.info.start_time).info.run_id)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return run_id, {int(m.step) for m in client.get_metric_history(run_id, "train/loss")}
    for old in same_job:
        if old.info.status == "RUNNING":  # a killed attempt this fresh start replaces
            client.set_terminated(old.info.run_id, "KILLED")
    tags.update({KEY_TAG: key_id(spec.fold_key), "medflow.key": spec.fold_key})
    run = client.create_run(experiment_id, tags=tags, run_name=spec.run_name)
    run_id = str(run.info.run_id)
    params = [Param(k, str(v)) for k, v in sorted(spec.params.items())]
    for lo in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[lo : lo + 100])
    return run_id, set()


def metric_list(values: Mapping[str, float | None], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]


# ---- the background logger --------------------------------------------------------------------------------
class MlflowLog:
    """One fold run, logged from a background thread (see the module docstring)."""

    def __init__(
        self,
        spec: FoldRunSpec,
        *,
        timeout_s: float,
        backfill: list[tuple[int, dict[str, float | None]]],
        warn: Callable[[str], None],
    ):
        self.spec, self.timeout_s, self._warn = spec, float(timeout_s), warn
        self.ids: dict[str, Any] = {}
        self.failed = False
        self._client: Any = None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="medflow-mlflow", daemon=True)
        self._thread.start()
        self._submit(lambda: self._open(backfill))

    def _submit(self, task: Callable[[], None]) -> None:
        if not self.failed:
            self._queue.put(task)

    def _work(self) -> None:
        try:
            self._client = client_for(self.spec.uri)  # the import (~1 s) outside the store lock
        except Exception as exc:
            self._fail(exc)
        while (task := self._queue.get()) is not None:
            if self.failed:
                continue
            try:
                with store_lock(self.spec.uri):
                    task()
            except Exception as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self._warn(f"MLflow tracking at {self.spec.uri} failed ({_describe(exc)}); the job goes on without it")

    def _open(self, backfill: list[tuple[int, dict[str, float | None]]]) -> None:
        self.ids = open_tree(self._client, self.spec)
        missing = [
            m for epoch, values in backfill if epoch not in self.ids["logged"] for m in metric_list(values, epoch)
        ]
        for lo in range(0, len(missing), 1000):
            self._client.log_batch(self.ids["run_id"], metrics=missing[lo : lo + 1000])

    def log_metrics(self, values: Mapping[str, float | None], step: int) -> None:
        snapshot = dict(values)
        self._submit(lambda: self._client.log_batch(self.ids["run_id"], metrics=metric_list(snapshot, step)))

    def finish(self, final: Mapping[str, float | None], step: int, artefacts: list[Path]) -> dict[str, Any] | None:
        """Final metrics, artefacts, converge the tree, FINISHED; wait ≤ timeout_s. The run's ids or None."""
        self.log_metrics(final, step)

        def end() -> None:
            for path in artefacts:
                if path.is_file():
                    self._client.log_artifact(self.ids["run_id"], str(path))
            self.ids["study_run_id"], self.ids["outer_run_id"] = converge(
                self._client, self.ids["experiment_id"], self.spec, self.ids["run_id"]
            )
            self._client.set_terminated(self.ids["run_id"], "FINISHED")

        self._submit(end)
        return self._close()

    def abort(self, status: str = "FAILED") -> None:
        self._submit(lambda: self._client.set_terminated(self.ids["run_id"], status))
        self._close()

    def _close(self) -> dict[str, Any] | None:
        self._queue.put(None)
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            self.failed = True
            self._warn(f"MLflow calls to {self.spec.uri} still pending after {self.timeout_s:g} s; left unfinished")
        if self.failed or not self.ids:
            return None
        return {k: v for k, v in self.ids.items() if k != "logged"} | {"uri": self.spec.uri}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return "the mlflow-skinny package is not installed: pip install 'medflow[mlflow]'"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def warn_line(command: str) -> Callable[[str], None]:
    def warn(message: str) -> None:
        print(f"medflow {command}: warning: {message}", file=sys.stderr, flush=True)

    return warn
