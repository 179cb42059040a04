"""Temporary work directories of trial backends, removed when their process is done with them.

A backend (trial/hf.py, trial/unsloth.py) keeps TRL's output directories and a saved tokenizer
in one temporary directory for as long as its process holds the loaded model: a warm actor's
next trial reuses it (trial/warm.py). It goes when the backend is collected or the process
exits normally. A process that is killed (a native hang's watchdog, SIGKILL, Ray ending its
workers) cannot clean up, so the directory's name carries the pid, and the driver removes the
directories of processes of this host that are gone (:func:`remove_orphans`), when a sweep
starts and when it ends.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

_NAME = re.compile(r"^(?P<prefix>grpo-ray-(?:hf|unsloth)-)(?P<pid>\d+)-")


def make_workdir(owner: object, prefix: str) -> Path:
    """A fresh ``<tmp>/<prefix><pid>-XXXX`` directory, removed when ``owner`` is collected or at exit."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    weakref.finalize(owner, shutil.rmtree, str(path), True)  # also runs at interpreter exit
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(tmp: str | None = None) -> int:
    """Remove the work directories of processes of this host that no longer run; how many."""
    base = Path(tmp or tempfile.gettempdir())
    removed = 0
    try:
        entries = list(base.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _NAME.match(entry.name)
        if m and entry.is_dir() and not _alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def shutdown_and_clean(timeout_s: float = 10.0) -> int:
    """End the Ray processes this driver started (a local cluster), wait for them, then remove
    the work directories they and earlier killed trial processes left; how many were removed.

    Ray's workers are killed when their node ends, so they cannot remove their own directories.
    On a cluster the driver only disconnects: the nodes' trial processes stay and clean up there.
    """
    import sys

    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # psutil comes with Ray; without it, only the directories of dead pids go
        psutil, children = None, []
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if psutil is not None and children:
        psutil.wait_procs(children, timeout=timeout_s)
    return remove_orphans()
