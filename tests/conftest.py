"""Shared fixtures: an isolated grpo-ray cache and the tiny model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Tests never touch the user's cache, and nothing may reach a hub.
    os.environ.setdefault("GRPO_RAY_CACHE", str(Path(config.rootpath, ".pytest_cache", "grpo-ray")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device, see README)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from grpo_ray.tiny import cached_tiny_model

    return cached_tiny_model()


@pytest.fixture(scope="session")
def asha_run(tmp_path_factory: pytest.TempPathFactory):
    """The smoke sweep with ASHA early stopping, run once: (run directory, the CLI's completed process).

    Built so that what ASHA and the report must show happens on purpose, not by luck of a
    random model whose rewards barely move: ASHA judges ``reward_weighted`` (the trial's own
    weighted total), so a trial that samples check_answer's weight 3.0 scores three times the
    (negative) check_answer reward of one at 1.0 and falls below the rung's cutoff once a
    weight-1.0 trial was recorded there; ``grpo.max_prompt_length: 8`` fits no prompt, so such a
    trial fails inside the trial (not at load time). With search seed 3406 Optuna samples
    (weight, max_prompt_length), in order: (1.0, 128) the seed recipe, (1.0, 128), (3.0, 128),
    (3.0, 8); the 3rd trial starts only after one of the first two ended, so it is compared
    with a recorded weight-1.0 value whatever the timing. Export is off: this sweep is about
    the search.
    """
    import subprocess
    import sys

    import yaml

    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "asha"
    spec["grpo"]["max_steps"] = 6
    spec["search"].update(
        seed=3406, num_samples=4, max_concurrent_trials=2, max_failures=0,
        space={
            "rewards.check_answer.weight": {"choice": [1.0, 3.0]},
            "grpo.max_prompt_length": {"choice": [128, 8]},
            "lora.rank": {"choice": [4, 8]},
            "grpo.temperature": {"uniform": [0.7, 1.2]},
        },
        early_stopping={"metric": "reward_weighted", "mode": "max", "grace_period": 2, "reduction_factor": 2},
    )
    spec["export"] = {"enabled": False}
    root = tmp_path_factory.mktemp("asha")
    (root / "asha.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run(
        [sys.executable, "-m", "grpo_ray.cli", "sweep", str(root / "asha.yaml"), "--storage", str(root / "runs")],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "runs" / "asha", r


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault-injection suite's one line (tests/test_faults.py, with the interrupted and concurrent
    sweeps of tests/test_interrupt.py), when it ran."""
    import sys

    s: dict = {}
    lost = []
    for name in ("test_faults", "test_interrupt"):
        part = getattr(sys.modules.get(name), "SUMMARY", None) or {}
        if "lost" in part:
            lost.append(part["lost"])
        s |= {k: v for k, v in part.items() if k != "lost"}
    if s:
        terminalreporter.write_line(
            f"fault injection: faults injected {s.get('injected', 0)} in {s.get('finished_sweeps', 0)} finished "
            f"sweep(s); trials ended with their cause {s.get('trials_with_cause', 0)}, retried and recovered "
            f"{s.get('recovered', 0)}, configuration errors failed without a retry {s.get('config_not_retried', 0)}, "
            f"secrets leaked {s.get('secrets_leaked', 'n/a')}, unwritable storage refused before any trial "
            f"{s.get('storage_faults', 0)}, interrupts (SIGINT, SIGTERM + a second signal) that exported nothing "
            f"{s.get('interrupts', 0)}, second drivers of a running sweep refused {s.get('second_drivers', 0)}, "
            f"resumes without a configuration run twice {s.get('clean_resumes', 0)}, "
            f"results lost {sum(lost) if lost else 'n/a'}"
        )


# Planted in the tracked sweep's environment; tests/test_tracking.py looks for them everywhere it wrote.
TRACKING_SECRETS = {
    "WANDB_API_KEY": "PLANTEDwandbKey0123456789abcdef01234567",
    "HF_TOKEN": "hf_PLANTEDtrackingSecret0123456789abc",
    "MLFLOW_TRACKING_PASSWORD": "PLANTEDmlflowPassword0123456789",
}


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory: pytest.TempPathFactory):
    """ONE small sweep with MLflow and W&B tracking on, shared by test_tracking.py and test_push.py.

    Two trials of the smoke spec, run at once: the seed recipe (trial 1) finishes; Optuna's
    second sample with search seed 8 has ``grpo.max_prompt_length: 8`` (and rank 4), which fits no prompt, so
    that trial fails inside its run (a real cause to record). MLflow gets a file store, W&B
    runs offline (WANDB_MODE=offline, its config and cache dirs under the test's directory).
    Secrets are planted in the environment. The winner is exported (f16 GGUF, no llama.cpp
    check): its best/ is what `grpo-ray push` uploads in test_push.py.

    Returns a dict: run (run directory), mlruns (the file store), wandb (the directory W&B was given:
    the run directory, its runs under wandb/offline-run-*),
    result (the CLI's completed process), env.
    """
    import subprocess
    import sys

    import yaml

    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "tracked"
    spec["sft"]["max_steps"] = 2
    spec["grpo"].update(max_steps=2, report_every=1)
    spec["data"]["eval"].update(size=4, max_new_tokens=16)
    spec["search"].update(seed=8, num_samples=2, max_concurrent_trials=2, max_failures=0,
                          space={"grpo.max_prompt_length": {"choice": [128, 8]}, "lora.rank": {"choice": [4, 8]}})
    spec["export"] = {"gguf": ["f16"], "check": False, "agreement_prompts": 0}
    root = tmp_path_factory.mktemp("tracked")
    (root / "tracked.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, **TRACKING_SECRETS, "MLFLOW_TRACKING_USERNAME": "planted-user", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}
    r = subprocess.run(
        [sys.executable, "-m", "grpo_ray.cli", "sweep", str(root / "tracked.yaml"), "--storage", str(root / "runs"),
         "--mlflow", str(root / "mlruns"), "--wandb", "grpo-ray-test"],
        capture_output=True, text=True, cwd=REPO, timeout=900, check=False, env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = root / "runs" / "tracked"
    return {"root": root, "run": run, "mlruns": root / "mlruns", "wandb": run, "result": r, "env": env}
