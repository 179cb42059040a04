"""One driver per run: a lock file in the run directory (``<storage>/<name>/driver.lock.json``).

Two sweeps of the same storage and name would write into one run directory: two experiment
states, trial directories of both, ``trials.json`` and ``best/`` of whichever ends last. The
first driver writes the lock (host, pid, start time, a heartbeat it refreshes every
:data:`HEARTBEAT_S` seconds); a second one reads it and refuses with the holder's name.

When is the holder gone (so ``--resume`` may take the run over, and ``status`` shows its
unfinished trials as INTERRUPTED)?

- same host: its pid is not alive, or is alive but started after the lock (a reused pid);
- another host: its heartbeat is older than :data:`STALE_S` (we cannot see its processes).

Local storage creates the lock with ``O_CREAT | O_EXCL``, so two drivers starting together
cannot both win. Object stores (S3, GCS) have no atomic create here: the lock is written,
then read back after a short pause, and the driver whose token is not the one read back
gives up. Two drivers that write within the same pause can still both believe they won; the
window is a fraction of a second and the heartbeat, which re-reads the token, makes the
loser stop the next time it beats (it logs and leaves the run alone) -- documented, not closed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from grpo_ray import storage
from grpo_ray.run_dir import lock_path

HEARTBEAT_S = 30.0  # how often the holder rewrites heartbeat_at
STALE_S = 300.0  # a lock of another host whose heartbeat is older than this belongs to a dead driver
_READ_BACK_PAUSE_S = 0.5  # object stores: wait this long before reading the lock back


class RunLockedError(RuntimeError):
    """Another driver holds the run (or held it and the sweep must be resumed): a user error."""


@dataclass
class LockInfo:
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    token: str
    command: str = ""

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on host {self.host}, started {started}"


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int, since: float) -> bool:
    """Is ``pid`` a live process of this host that started no later than ``since`` (the lock)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A pid reused by a later process is not the driver that wrote the lock.
        return proc.create_time() <= since + 1.0
    except Exception:  # psutil missing or the process just ended: trust os.kill
        return True


def holder_alive(info: LockInfo, now: float | None = None) -> bool:
    """Whether the driver that wrote ``info`` still runs (see the module docstring for how)."""
    if info.host == _host():
        return _pid_alive(info.pid, info.started_at)
    return (now or time.time()) - info.heartbeat_at < STALE_S


def read_lock(run_dir: str) -> LockInfo | None:
    """The run's lock, or None when there is none (or it is unreadable: a half-written one)."""
    try:
        data = json.loads(storage.read_text(lock_path(run_dir)))
        return LockInfo(**{k: data[k] for k in LockInfo.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def driver_alive(run_dir: str) -> bool:
    """True while a live driver holds the run (``status`` shows its trials as they are)."""
    info = read_lock(run_dir)
    return info is not None and holder_alive(info)


class RunLock:
    """The lock this driver holds; :meth:`release` (or the context manager) gives it back."""

    def __init__(self, run_dir: str, info: LockInfo) -> None:
        self.run_dir, self.info = run_dir, info
        self.path = lock_path(run_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="grpo-ray-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = read_lock(self.run_dir)
            if current is not None and current.token != self.info.token:
                return  # taken over (we were presumed dead): never write over the new holder
            self.info.heartbeat_at = time.time()
            try:
                storage.write_text(self.path, json.dumps(asdict(self.info)))
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)  # a beat being written must not bring the file back after its removal
        current = read_lock(self.run_dir)
        if current is not None and current.token == self.info.token:
            storage.remove_file(self.path)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(run_dir: str, resume: bool, command: str = "") -> RunLock:
    """Take the run for this driver, or raise :class:`RunLockedError` naming who holds it.

    A lock whose holder is gone is taken over by ``--resume`` only: a fresh sweep into an
    interrupted run would mix its trials with the old ones. Raises OSError when the storage
    cannot be written (the caller turns it into its storage message).
    """
    now = time.time()
    info = LockInfo(host=_host(), pid=os.getpid(), started_at=now, heartbeat_at=now,
                    token=uuid.uuid4().hex, command=command)
    path = lock_path(run_dir)
    held = read_lock(run_dir)
    if held is not None:
        if holder_alive(held):
            raise RunLockedError(
                f"{run_dir}: the run is held by another sweep ({held.describe()}; lock {path}); wait for it to end, "
                "or give this sweep another name or --storage")
        if not resume:
            raise RunLockedError(
                f"{run_dir}: an earlier sweep of this run ({held.describe()}) ended without finishing; continue it "
                "with `grpo-ray sweep SPEC --resume`, or give this sweep another name or --storage")
        storage.remove_file(path)  # taken over: the holder is gone
    text = json.dumps(asdict(info))
    if not storage.is_uri(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another driver won the race between our read and this create
            other = read_lock(run_dir)
            raise RunLockedError(f"{run_dir}: the run is held by another sweep "
                                 f"({other.describe() if other else 'starting now'}; lock {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
    else:
        storage.write_text(path, text)
        time.sleep(_READ_BACK_PAUSE_S)
        back = read_lock(run_dir)
        if back is None or back.token != info.token:
            raise RunLockedError(f"{run_dir}: the run is held by another sweep "
                                 f"({back.describe() if back else 'starting now'}; lock {path})")
    return RunLock(run_dir, info)
