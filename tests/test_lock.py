"""The run lock (run_lock.py) on its own: who holds a run, when a holder is gone, take-over.

The two-drivers case on a real sweep is in test_interrupt.py; these are the lock's rules,
with real processes (a live one, a dead one) rather than made-up pids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from grpo_ray import run_lock
from grpo_ray.run_dir import LOCK_FILE
from grpo_ray.run_lock import RunLockedError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(run, **fields):
    now = time.time()
    info = {"host": run_lock._host(), "pid": _dead_pid(), "started_at": now, "heartbeat_at": now,
            "token": "other", "command": "grpo-ray sweep x.yaml"} | fields
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps(info))


def test_a_live_holder_refuses_a_second_driver_and_is_named(tmp_path):
    run = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)  # its start time is before the lock's
        _write(run, pid=live.pid)
        for resume in (False, True):
            with pytest.raises(RunLockedError, match=f"held by another sweep \\(pid {live.pid} on host "):
                run_lock.acquire(str(run), resume=resume)
        assert run_lock.driver_alive(str(run))
    finally:
        live.kill()
        live.wait()
    assert not run_lock.driver_alive(str(run))  # the same lock, its process gone


def test_a_gone_holder_is_taken_over_by_resume_only(tmp_path):
    run = tmp_path / "run"
    _write(run)
    with pytest.raises(RunLockedError, match="--resume"):
        run_lock.acquire(str(run), resume=False)
    lock = run_lock.acquire(str(run), resume=True)
    held = json.loads((run / LOCK_FILE).read_text())
    assert held["pid"] != 0 and held["token"] == lock.info.token and held["host"] == run_lock._host()
    with pytest.raises(RunLockedError, match="held by another sweep"):  # now this process holds it
        run_lock.acquire(str(run), resume=True)
    lock.release()
    assert not (run / LOCK_FILE).exists()
    run_lock.acquire(str(run), resume=False).release()  # a released run is free again


def test_another_hosts_holder_is_judged_by_its_heartbeat(tmp_path):
    run = tmp_path / "run"
    _write(run, host="elsewhere", pid=1, heartbeat_at=time.time() - 5)
    with pytest.raises(RunLockedError, match="host elsewhere"):
        run_lock.acquire(str(run), resume=True)
    _write(run, host="elsewhere", pid=1, heartbeat_at=time.time() - run_lock.STALE_S - 1)
    run_lock.acquire(str(run), resume=True).release()


def test_a_lock_taken_over_is_never_released_by_its_former_holder(tmp_path):
    run = tmp_path / "run"
    lock = run_lock.acquire(str(run), resume=False)
    _write(run, token="newer", pid=_dead_pid())  # what a take-over leaves
    lock.release()
    assert json.loads((run / LOCK_FILE).read_text())["token"] == "newer"


def test_the_lock_on_object_storage(tmp_path, monkeypatch):
    """The same rules on an S3 API (moto's server on localhost): no atomic create there, the
    lock is written and read back."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="grpo")
        from grpo_ray import storage

        run = f"s3://grpo/runs/r?endpoint_override={host}:{port}&scheme=http"
        lock = run_lock.acquire(run, resume=False)
        assert json.loads(storage.read_text(storage.join(run, LOCK_FILE)))["pid"] == lock.info.pid
        assert run_lock.driver_alive(run)
        with pytest.raises(RunLockedError, match="held by another sweep"):
            run_lock.acquire(run, resume=True)
        lock.release()
        assert not storage.exists(storage.join(run, LOCK_FILE)) and not run_lock.driver_alive(run)
    finally:
        server.stop()
