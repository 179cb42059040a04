"""Object-store storage for real: the smoke sweep writes to an S3-compatible server on localhost.

moto's server speaks the S3 HTTP API; Ray Tune, pyarrow.fs and our storage module talk to it
exactly as they would to a bucket (credentials from the environment, as on a cluster).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def bucket_uri():
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="grpo")
    yield f"s3://grpo/runs?endpoint_override={host}:{port}&scheme=http"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_sweep_to_a_bucket_then_status_and_pull(bucket_uri, tmp_path):
    from grpo_ray import storage
    from grpo_ray.views.status import read_status

    cli = [sys.executable, "-m", "grpo_ray.cli"]
    r = subprocess.run([*cli, "sweep", "sweeps/smoke.yaml", "--storage", bucket_uri],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = storage.join(bucket_uri, "smoke")
    assert "smoke-q8_0.gguf" in storage.list_dir(storage.join(run, "best"))
    best = json.loads(storage.read_text(storage.join(run, "best", "best.json")))
    assert len(read_status(run)) == 3 and best["trial_id"] in {s.trial_id for s in read_status(run)}

    dest = tmp_path / "pulled"
    r = subprocess.run([*cli, "pull", run, str(dest)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((dest / "best.json").read_text()) == best
    assert (dest / "smoke-q8_0.gguf").stat().st_size > 0 and (dest / "merged16").is_dir()
