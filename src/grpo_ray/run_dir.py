"""Every path under a run directory, ``<storage>/<name>`` (local or a URI): one name for each file,
used by whatever writes it and whatever reads it.

::

    <storage>/<name>/
      spec.resolved.yaml        the spec with every default filled in (written before the search)
      driver.lock.json          the driver that holds the run (run_lock.py)
      optuna-journal.log        the Optuna study (local storage, search.study_storage unset)
      experiment_state-*.json   Ray Tune's snapshots of the experiment (views/status.py reads the newest)
      tune_trainable_<id>_*/    one directory per trial: checkpoint_*/ (its LoRA), result.json (Tune's log of
                                its reports), error.txt (Tune's traceback), fault.txt (what the trial
                                wrote when it could not raise)
      trials.json               every trial's config, last metrics and error (after the search)
      utilization.json          the sweep's GPU use
      phases.json               what each running trial is doing now (written by the driver while it runs;
                                trial/phases.py, read by `grpo-ray status`)
      report.html               written by `grpo-ray report`
      best/                     the exported winner: README.md (model card), export.json, lora/,
                                merged16/, *.gguf, Modelfile, and best.json, written last
"""

from __future__ import annotations

from grpo_ray import storage

SPEC_RESOLVED = "spec.resolved.yaml"
LOCK_FILE = "driver.lock.json"
STUDY_JOURNAL = "optuna-journal.log"  # in a local run directory: the study, readable by optuna-dashboard
SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "experiment_state-", ".json"
TRIAL_DIR_PREFIX = "tune_trainable_"  # Tune names a trial's directory after the trainable (trial/run.py)
CHECKPOINT_PREFIX = "checkpoint_"
RESULT_FILE = "result.json"  # written by Tune into a trial's directory: one line per report
ERROR_FILE = "error.txt"  # written by Tune into a failed trial's directory
FAULT_FILE = "fault.txt"  # written by a trial into its storage directory when it cannot raise (trial/guard.py)
TRIALS = "trials.json"
UTILIZATION = "utilization.json"
PHASES = "phases.json"
REPORT_HTML = "report.html"
BEST_DIR = "best"
# inside best/
BEST_JSON = "best.json"
MODEL_CARD = "README.md"
EXPORT_JSON = "export.json"
LORA_DIR = "lora"
MERGED_DIR = "merged16"
MODELFILE = "Modelfile"


def spec_resolved_path(run_dir: str) -> str:
    return storage.join(run_dir, SPEC_RESOLVED)


def lock_path(run_dir: str) -> str:
    return storage.join(run_dir, LOCK_FILE)


def trials_path(run_dir: str) -> str:
    return storage.join(run_dir, TRIALS)


def utilization_path(run_dir: str) -> str:
    return storage.join(run_dir, UTILIZATION)


def best_path(run_dir: str) -> str:
    return storage.join(run_dir, BEST_DIR)


def best_json_path(run_dir: str) -> str:
    return storage.join(run_dir, BEST_DIR, BEST_JSON)


def is_snapshot(name: str) -> bool:
    """Whether an entry of the run directory is one of Tune's experiment snapshots."""
    return name.startswith(SNAPSHOT_PREFIX) and name.endswith(SNAPSHOT_SUFFIX)


def trial_dir_prefix(trial_id: str) -> str:
    """How the directory of the trial ``trial_id`` starts (Tune appends the config and a date)."""
    return f"{TRIAL_DIR_PREFIX}{trial_id}_"


def phases_path(run_dir: str) -> str:
    return storage.join(run_dir, PHASES)
