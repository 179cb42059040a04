"""The cluster-launcher files: Ray's own validation accepts them, and they keep their promises.

Ray's `prepare_config` + `validate_config` are what `ray up` runs before it calls a cloud
(defaults filled from the provider's defaults.yaml, then ray-schema.json and Ray's checks);
nothing here reaches a cloud. The rest reads the files as a reviewer would: a CPU-only head
that runs the driver, 0..N single-GPU workers that fit the real sweep's trials, the pinned
stack, an object-store bucket, the dashboard on localhost only, token authentication on, and
no credential in the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO
from ray.autoscaler._private.util import prepare_config, validate_config

FILES = {"aws": REPO / "cluster" / "gpu.yaml", "gcp": REPO / "cluster" / "gpu-gcp.yaml"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict:
    config = prepare_config(_load(path))
    validate_config(config)
    return config


def _ray_pin() -> str:
    pin = re.search(r'"ray\[[a-z,]+\]==([^"]+)"', (REPO / "pyproject.toml").read_text())  # no tomllib on 3.10
    assert pin, "pyproject.toml pins no ray version"
    return pin.group(1)


@pytest.mark.parametrize("provider", FILES)
def test_ray_accepts_the_cluster_file(provider):
    config = _prepared(FILES[provider])
    assert config["provider"]["type"] == provider
    assert set(config["available_node_types"]) == {"head", "gpu_worker"} and config["head_node_type"] == "head"


def test_ray_validation_is_not_a_rubber_stamp():
    bad = _load(FILES["aws"])
    bad["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(bad)))


@pytest.mark.parametrize("provider", FILES)
def test_cpu_head_runs_the_driver_and_gpu_workers_scale_from_zero(provider):
    config = _prepared(FILES[provider])
    head = config["available_node_types"]["head"]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    assert any("--head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= config["max_workers"]
    assert worker["resources"]["GPU"] == 1
    # A trial of the real sweep fits one worker, and only a worker.
    from grpo_ray.config.load import load_spec

    trial = load_spec(REPO / "sweeps" / "rewards.yaml").resources
    assert trial.gpu <= worker["resources"]["GPU"] and trial.cpu <= worker["resources"]["CPU"]
    assert trial.cpu > head["resources"]["CPU"]


@pytest.mark.parametrize("provider", FILES)
def test_every_node_installs_the_pinned_stack(provider):
    config = _prepared(FILES[provider])
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        text = "\n".join(commands)
        assert 'pip install -e ".[gpu]"' in text
        # The nodes' Ray is the driver's and the tests' Ray: a mismatch fails at connect time.
        assert f'"ray[default]=={_ray_pin()}"' in text
    assert config["file_mounts"]["/home/ubuntu/grpo-ray"] == "."
    assert ".gitignore" in config["rsync_filter"]  # never the local .venv


@pytest.mark.parametrize(("provider", "scheme"), [("aws", "s3://"), ("gcp", "gs://")])
def test_the_run_goes_to_a_bucket(provider, scheme):
    config = _prepared(FILES[provider])
    setup = "\n".join(config["head_setup_commands"])
    storage = re.search(r"GRPO_RAY_STORAGE=%s\\n' '([^']+)'", setup)
    assert storage and storage.group(1).startswith(scheme), setup


@pytest.mark.parametrize("provider", FILES)
def test_dashboard_on_localhost_and_token_auth_on(provider):
    config = _prepared(FILES[provider])
    commands = "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"]
                         + config["head_setup_commands"] + config["worker_setup_commands"])
    assert "--dashboard-host=127.0.0.1" in "\n".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in commands and "--dashboard-port" not in commands  # Ray's GCP default binds 0.0.0.0
    # Every node's Ray runs with token auth; the token comes from a file copied by `ray up`.
    for node_setup in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert "export RAY_AUTH_MODE=token" in "\n".join(node_setup)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key|aws_session_token",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:private_key)",
    "literal Ray token": r"RAY_AUTH_TOKEN\s*=",
    "hex token (what `ray get-auth-token` makes)": r"\b[0-9a-fA-F]{32,}\b",
    "AWS secret key shape": r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])",
}


@pytest.mark.parametrize("provider", FILES)
def test_no_credentials_in_the_file(provider):
    text = FILES[provider].read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{FILES[provider].name}: {what}"
    config = _load(FILES[provider])
    assert set(config["auth"]) == {"ssh_user"}  # Ray makes and keeps the SSH key
    assert not {"aws_credentials", "gcp_credentials"} & set(config["provider"])


def test_the_secret_scan_finds_secrets():
    leaked = ("provider:\n  aws_secret_access_key: x\n  key: AKIAABCDEFGHIJKLMNOP\n"
              "  secret: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"  # AWS's documented example key
              "env: RAY_AUTH_TOKEN=3f9c\ntoken: 9b1f4e7a2c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b\n"
              "-----BEGIN RSA PRIVATE KEY-----\n")
    found = {what for what, pattern in SECRET_PATTERNS.items() if re.search(pattern, leaked)}
    assert found == set(SECRET_PATTERNS)
