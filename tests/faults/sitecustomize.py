"""Fault injection for medflow's tests; not part of the product.

Python imports ``sitecustomize`` at start-up from the first folder on its path that has one, so a test
that puts this folder on PYTHONPATH (``conftest.fault_env``) injects faults into the real commands it
launches (under mpiexec, srun or Snakemake too) without any hook in medflow itself:

- ``MEDFLOW_TEST_FAIL_ONCE=<command>:<marker>``: ``medflow <command>`` exits 1 once (creating
  ``<marker>``), then runs normally — a transient failure for retry tests.
- ``MEDFLOW_TEST_KILL_AFTER_EPOCH=<k>``: rank 0 of ``medflow train`` SIGKILLs itself right after the
  checkpoint of epoch ``k`` is written — a real kill at a known point, for resume tests.
- ``MEDFLOW_TEST_HOLD_AFTER_EPOCH=<k>:<marker>``: once (while ``<marker>`` does not exist), rank 0 of
  ``medflow train`` creates ``<marker>`` right after the checkpoint of epoch ``k`` and then sleeps, so
  the other ranks wait in the next epoch's first collective — a job held at a known point while a
  test kills one of its nodes from outside.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
import time


def _fail_once() -> None:
    target, _, marker = os.environ.get("MEDFLOW_TEST_FAIL_ONCE", "").partition(":")
    argv = sys.argv
    is_command = len(argv) > 1 and os.path.basename(argv[0]) == "medflow" and argv[1] == target
    if is_command and marker and not os.path.exists(marker):
        open(marker, "w").close()
        print(f"medflow {target}: failing once on purpose (MEDFLOW_TEST_FAIL_ONCE, marker {marker})", file=sys.stderr)
        sys.exit(1)


class _AfterCheckpoint(importlib.abc.MetaPathFinder):
    """When `medflow.train.fold` is imported, wrap its `save_checkpoint` to call ``action`` on rank 0
    after the checkpoint of epoch k."""

    def __init__(self, epoch: int, action):  # type: ignore[no-untyped-def]
        self.epoch = epoch
        self.action = action

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "medflow.train.fold":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        epoch, action = self.epoch, self.action

        def exec_and_patch(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            save = module.save_checkpoint

            def save_then_kill(job, d, model, optimizer, scaler, progress, *rest):  # type: ignore[no-untyped-def]
                save(job, d, model, optimizer, scaler, progress, *rest)
                if d.is_root and progress.epochs_done == epoch + 1:
                    action()

            module.save_checkpoint = save_then_kill

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hold(marker: str):  # type: ignore[no-untyped-def]
    def hold() -> None:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
        print(f"medflow train: holding after this checkpoint (MEDFLOW_TEST_HOLD_AFTER_EPOCH, {marker})", flush=True)
        time.sleep(900)

    return hold


_fail_once()
if os.environ.get("MEDFLOW_TEST_KILL_AFTER_EPOCH"):
    sys.meta_path.insert(0, _AfterCheckpoint(int(os.environ["MEDFLOW_TEST_KILL_AFTER_EPOCH"]), _kill))
if os.environ.get("MEDFLOW_TEST_HOLD_AFTER_EPOCH"):
    _epoch, _, _marker = os.environ["MEDFLOW_TEST_HOLD_AFTER_EPOCH"].partition(":")
    sys.meta_path.insert(0, _AfterCheckpoint(int(_epoch), _hold(_marker)))
