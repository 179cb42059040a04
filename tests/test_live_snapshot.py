"""Reading a sweep while it runs: Tune's snapshot caught half-written, and a progress listener
that fails. Both happened on an H200 at 8d5b03e (bench/README.md): a listener read the snapshot
mid-copy, raised, and Tune marked a finished trial ERROR and stopped its warm actor."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from grpo_ray.cli import app
from grpo_ray.sweep.tune_progress import ProgressCallback
from grpo_ray.views.status import SNAPSHOT_READS, read_snapshot, read_status


def _snapshot(trial_id: str = "a1") -> str:
    """A snapshot as Tune writes it, one finished trial (only the fields read_status reads)."""
    trial = {"trial_id": trial_id, "status": "TERMINATED", "config": {"lora.rank": 8}, "relative_logdir": None}
    runtime = {"last_result": {"step": 5, "reward": 1.5}, "num_failures": 0}
    return json.dumps({"trial_data": [[json.dumps(trial), json.dumps(runtime)]], "runner_data": {"pad": "x" * 4000}})


def test_a_snapshot_rewritten_while_read_is_read_whole(tmp_path: Path):
    # What a reader sees while pyarrow's copy_files rewrites the file in place: its first part.
    path = tmp_path / "experiment_state-2026-12-03_15-26-23.json"
    whole = _snapshot()
    path.write_text(whole[: len(whole) // 2])
    done = threading.Timer(0.3, lambda: path.write_text(whole))  # the copy finishes during the retries
    done.start()
    try:
        assert read_snapshot(str(path)) == json.loads(whole)
    finally:
        done.join()
    assert [t.trial_id for t in read_status(str(tmp_path))] == ["a1"]


def test_a_snapshot_that_stays_broken_is_named(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("grpo_ray.views.status.SNAPSHOT_RETRY_S", 0.01)
    path = tmp_path / "experiment_state-2026-12-03_15-26-23.json"
    path.write_text(_snapshot()[:100])
    with pytest.raises(ValueError, match=f"experiment_state-.*not a whole JSON snapshot in {SNAPSHOT_READS} reads"):
        read_snapshot(str(path))
    # The CLI: one line naming the file, exit 2, no traceback.
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "experiment_state-2026-12-03_15-26-23.json" in result.output and "Traceback" not in result.output


def test_a_failing_progress_listener_does_not_reach_tune(caplog):
    seen = []

    def listener(kind: str, data: dict) -> None:
        seen.append(kind)
        raise json.JSONDecodeError("Unterminated string", "{", 1)  # what the benchmark's listener raised

    callback = ProgressCallback(listener)
    trial = SimpleNamespace(trial_id="a1", config={}, error_file=None)
    with caplog.at_level(logging.WARNING, logger="grpo_ray.sweep.tune_progress"):
        callback.on_trial_result(0, [], trial, {"step": 1})
        callback.on_trial_complete(0, [], trial)  # Tune's stop_trial calls this: raising here errors the trial
    assert seen == ["result", "complete"]
    assert [r.message for r in caplog.records] == [
        "progress listener failed on a 'result' event; the sweep goes on",
        "progress listener failed on a 'complete' event; the sweep goes on",
    ]


def test_status_watch_keeps_its_last_table_through_a_snapshot_in_flux(tmp_path: Path, monkeypatch):
    from grpo_ray.views.status import TrialStatus

    calls = iter([
        [TrialStatus("a1", "RUNNING", {}, {"step": 5}, 0)],
        ValueError("experiment_state-x.json: not a whole JSON snapshot in 5 reads"),
        KeyboardInterrupt(),  # the user's Ctrl-C ends --watch
    ])

    def fake_read_status(run_dir: str):
        got = next(calls)
        if isinstance(got, BaseException):
            raise got
        return got

    monkeypatch.setattr("grpo_ray.views.status.read_status", fake_read_status)
    monkeypatch.setattr("time.sleep", lambda s: None)
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--watch", "1"])
    assert result.exit_code == 130, result.output  # the Ctrl-C, not the ValueError, ended it
    assert "status: experiment_state-x.json: not a whole JSON snapshot" in result.output
    assert "a1" in result.output and "RUNNING" in result.output  # the table from before stays
