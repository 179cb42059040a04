"""Tracking for real: one tiny local Ray sweep (conftest.py ``tracked_run``: 2 trials, one fails
inside its run) tracked into a real MLflow file store, read back with ``mlflow.search_runs``, and
into Weights & Biases in offline mode, read back from the run directories W&B wrote (its
transaction log, the ``.wandb`` file, parsed with wandb's own protobuf classes). Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, TRACKING_SECRETS

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


def _trials(run: Path) -> dict[str, dict[str, Any]]:
    return {t["trial_id"]: t for t in json.loads((run / "trials.json").read_text())}


def _mlflow_runs(tracked: dict[str, Any]) -> tuple[Any, list[Any]]:
    """(the sweep's parent run, its trial runs), through mlflow's public search API."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads its file store only when asked (as `mlflow ui`)
    mlflow.set_tracking_uri(f"file://{tracked['mlruns']}")
    runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("grpo_ray.role") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_mlflow_gets_one_run_per_trial_with_params_metrics_by_step_and_status(tracked_run):
    run_dir = tracked_run["run"]
    trials = _trials(run_dir)
    assert len(trials) == 2 and sum(1 for t in trials.values() if t["error"]) == 1
    parent, children = _mlflow_runs(tracked_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["grpo_ray.run_dir"] == str(run_dir)
    by_trial = {r.data.tags["grpo_ray.trial_id"]: r for r in children}
    assert set(by_trial) == set(trials)  # one run per trial, nested under the sweep's
    df = mlflow.search_runs(experiment_names=["tracked"], filter_string="tags.`grpo_ray.role` = 'trial'")
    assert len(df) == 2 and {"params.lora.rank", "params.grpo.max_prompt_length", "metrics.reward"} <= set(df.columns)
    client = mlflow.MlflowClient()
    for tid, t in trials.items():
        r = by_trial[tid]
        assert r.data.params == {k: json.dumps(v) for k, v in t["config"].items()}  # the sampled config
        if t["error"]:
            assert r.info.status == "FAILED" and r.data.tags["grpo_ray.status"] == "failed"
            cause = r.data.tags["grpo_ray.error"]
            assert cause and cause in t["error"], (cause, t["error"][-500:])
            continue
        assert r.info.status == "FINISHED" and r.data.tags["grpo_ray.status"] == "finished"
        # Every report of the trial, by GRPO step (report_every 1, max_steps 2).
        for key in ("reward", "eval_accuracy", "format_rate", "completion_length", "rewards/check_answer/mean"):
            history = client.get_metric_history(r.info.run_id, key)
            assert [m.step for m in history] == [1, 2], key
        assert client.get_metric_history(r.info.run_id, "reward")[-1].value == pytest.approx(t["metrics"]["reward"])
        assert r.data.metrics["eval_accuracy"] == pytest.approx(t["metrics"]["eval_accuracy"])


def test_mlflow_best_run_is_tagged_with_best_json_card_and_gguf_names(tracked_run):
    run_dir = tracked_run["run"]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    parent, children = _mlflow_runs(tracked_run)
    tagged = [r for r in children if r.data.tags.get("grpo_ray.best") == "true"]
    assert [r.data.tags["grpo_ray.trial_id"] for r in tagged] == [best["trial_id"]]
    r = tagged[0]
    ggufs = sorted(p.name for p in (run_dir / "best").glob("*.gguf"))
    assert ggufs == ["tracked-f16.gguf"] and r.data.tags["grpo_ray.gguf_files"] == ", ".join(ggufs)
    assert parent.data.tags["grpo_ray.best_trial"] == best["trial_id"]
    assert parent.data.tags["grpo_ray.best_run_id"] == r.info.run_id
    dest = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="best",
                                                    dst_path=str(tracked_run["root"] / "dl")))
    assert json.loads((dest / "best.json").read_text()) == best
    assert (dest / "README.md").read_text() == (run_dir / "best" / "README.md").read_text()


def _leveldb_log(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB's log framing, which W&B uses as is: 32 KiB blocks of chunks, each
    with a crc32c, a little-endian length and a type (1 whole, 2 first, 3 middle, 4 last).
    wandb >= 0.2x ships no Python reader of its own (wandb-core, in Go, writes and syncs it)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros to the end of the block
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            parts = payload
        elif kind == 3:
            parts += payload
        elif kind == 4:
            out.append(parts + payload)
    return out


def _wandb_records(run_dir: Path) -> dict[str, Any]:
    """What an offline run directory holds, read from its transaction log (the .wandb file that
    `wandb sync` uploads): config, history rows, summary, tags, exit code, group."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "tags": [], "exit_code": None, "group": None}
    for data in _leveldb_log(log):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["tags"] = list(rec.run.tags)
            out["group"] = rec.run.run_group
            out["id"] = rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def test_wandb_offline_writes_a_run_per_trial_with_the_same_content(tracked_run):
    run_dir = tracked_run["run"]
    trials = _trials(run_dir)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    dirs = sorted(tracked_run["wandb"].glob("wandb/offline-run-*"))
    runs = [(d, _wandb_records(d)) for d in dirs]
    # One run per trial; the best trial's run is opened once more (same id) to tag it.
    ids = [r["id"] for _, r in runs]
    assert sorted(set(ids)) == sorted(trials) and ids.count(best["trial_id"]) == 2 and len(ids) == 3
    first = {}
    for d, r in runs:
        first.setdefault(r["id"], (d, r))
    for tid, t in trials.items():
        d, r = first[tid]
        assert r["group"] == "tracked"
        for k, v in t["config"].items():
            assert r["config"][k] == json.dumps(v)
        if t["error"]:
            assert r["exit_code"] == 1 and r["summary"]["status"] == "failed" and "failed" in r["tags"]
            assert r["summary"]["error"] in t["error"]
            continue
        assert r["exit_code"] == 0 and r["summary"]["status"] == "finished" and "finished" in r["tags"]
        rows = [h for h in r["history"] if "reward" in h]
        assert [h["step"] for h in rows] == [1, 2]  # every report, by GRPO step
        assert rows[-1]["reward"] == pytest.approx(t["metrics"]["reward"])
        assert rows[-1]["eval_accuracy"] == pytest.approx(t["metrics"]["eval_accuracy"])
    (d, r), = [(d, r) for d, r in runs[::-1] if r["id"] == best["trial_id"]][:1]  # the reopening, newest
    assert "best" in r["tags"] and r["summary"]["best"] is True
    assert r["summary"]["gguf_files"] == ["tracked-f16.gguf"]
    assert json.loads((d / "files" / "best.json").read_text()) == best
    assert (d / "files" / "README.md").read_text() == (run_dir / "best" / "README.md").read_text()


def test_no_planted_secret_reaches_the_stores_logs_or_output(tracked_run):
    """The MLflow store, W&B's run directories (debug logs included), its config and cache dirs,
    the run directory and the CLI's output are searched for the planted values."""
    root, r = tracked_run["root"], tracked_run["result"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any("mlruns" in p.parts for p in files) and any(p.name.endswith(".wandb") for p in files)
    leaks = [f"{p}: {k}" for p in files for k, v in TRACKING_SECRETS.items() if v.encode() in p.read_bytes()]
    leaks += [f"CLI output: {k}" for k, v in TRACKING_SECRETS.items() if v in r.stdout + r.stderr]
    assert not leaks


def test_final_status_of_a_trial():
    """The status each backend records (the stopped-early case needs ASHA: see test_early_stopping.py)."""
    from grpo_ray.tracking import final_status

    assert final_status({"step": 4}, None) == ("finished", None)
    assert final_status({"step": 2, "stopped_early": True}, None) == ("stopped_early", None)
    err = "Traceback (most recent call last):\n  File x\nValueError: no GRPO prompt fits grpo.max_prompt_length"
    assert final_status({"step": 2}, err) == ("failed", "ValueError: no GRPO prompt fits grpo.max_prompt_length")


def test_tracking_settings_are_checked_before_any_trial(tmp_path):
    from grpo_ray.config.errors import SpecError
    from grpo_ray.config.load import parse_spec

    text = (REPO / "sweeps" / "smoke.yaml").read_text()
    with pytest.raises(SpecError) as e:
        parse_spec(text + "tracking:\n  mlflow_uri: https://me:s3cret@mlflow.example.com\n")
    assert e.value.field == "tracking.mlflow_uri" and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    assert "s3cret" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", "sweeps/smoke.yaml", "--storage",
                        str(tmp_path), "--wandb", "team/project"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--wandb" in r.stderr and "cannot contain" in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())  # refused before anything ran


@pytest.fixture(scope="module")
def reexported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A second small tracked sweep whose two trials both finish (a grid over lora.rank), then
    `grpo-ray export --trial <the other one>`: the winner moves, and the trackers must follow."""
    import yaml

    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "moved"
    spec["sft"]["max_steps"] = 2
    spec["grpo"].update(max_steps=2, report_every=2)
    spec["data"]["eval"].update(size=4, max_new_tokens=16)
    spec["search"].update(sampler="grid", num_samples=2, max_concurrent_trials=2, space={"lora.rank": {"choice": [4, 8]}})
    spec["export"] = {"gguf": ["f16"], "check": False, "agreement_prompts": 0}
    root = tmp_path_factory.mktemp("moved")
    (root / "moved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}
    cli = [sys.executable, "-m", "grpo_ray.cli"]
    r = subprocess.run(cli + ["sweep", str(root / "moved.yaml"), "--storage", str(root / "runs"), "--mlflow",
                              str(root / "mlruns"), "--wandb", "grpo-ray-test"],
                       capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = root / "runs" / "moved"
    first = json.loads((run / "best" / "best.json").read_text())["trial_id"]
    (other,) = [t for t in _trials(run) if t != first]
    e = subprocess.run(cli + ["export", str(run), "--trial", other], capture_output=True, text=True, cwd=REPO,
                       timeout=900, env=env)
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    return {"root": root, "run": run, "mlruns": root / "mlruns", "first": first, "other": other, "export": e}


def test_a_re_export_of_another_trial_moves_the_best_tag_in_mlflow(reexported):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(f"file://{reexported['mlruns']}")
    runs = mlflow.search_runs(experiment_names=["moved"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("grpo_ray.role") == "sweep"]
    by_trial = {r.data.tags["grpo_ray.trial_id"]: r for r in runs if "grpo_ray.trial_id" in r.data.tags}
    first, other = by_trial[reexported["first"]], by_trial[reexported["other"]]
    assert other.data.tags.get("grpo_ray.best") == "true" and other.data.tags["grpo_ray.gguf_files"] == "moved-f16.gguf"
    assert "grpo_ray.best" not in first.data.tags and "grpo_ray.gguf_files" not in first.data.tags
    assert parent.data.tags["grpo_ray.best_trial"] == reexported["other"]
    assert parent.data.tags["grpo_ray.best_run_id"] == other.info.run_id
    assert "MLflow: tagged trial " + reexported["other"] in reexported["export"].stderr


def test_a_re_export_of_another_trial_moves_the_best_tag_in_wandb(reexported):
    runs = [_wandb_records(d) for d in sorted(reexported["run"].glob("wandb/offline-run-*"))]
    # W&B keeps every reopening as its own offline directory; the newest of each trial is its state now.
    newest: dict[str, dict[str, Any]] = {}
    for r in runs:
        newest[r["id"]] = r
    assert "best" in newest[reexported["other"]]["tags"] and newest[reexported["other"]]["summary"]["best"] is True
    assert "best" not in newest[reexported["first"]]["tags"]
    assert newest[reexported["first"]]["summary"]["best"] is False
