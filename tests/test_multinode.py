"""A sweep on a real multi-node Ray cluster (on localhost) survives the loss of a worker node.

Three Ray nodes started with `ray start`, as `ray up` starts them on a cloud: a head with no
CPU for trials (it runs the driver only, like the CPU head of cluster/gpu.yaml) and two
worker nodes, each with one CPU and a resource of its own. Token authentication is on, as in
cluster/gpu.yaml. The sweep runs as `ray job submit` would run it on the head (a driver
process with RAY_ADDRESS set, its storage from GRPO_RAY_STORAGE). Mid-trial, every process
of worker node "a" is SIGKILLed (raylet, trial worker, agents); the sweep must still finish
with every trial completed, the lost one retried on the surviving node, no result lost.

The nodes share this machine's IP, so "which node ran this trial" is read from process
trees: Tune records each result's worker pid, and a node's processes all descend from its
`ray start --block` process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO

MAX_STEPS = 6  # reports at steps 2, 4, 6: room to kill a node between a trial's first and last report
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen

    def pids(self) -> set[int]:
        """This node's processes: `ray start --block` and everything it started (raylet, workers...)."""
        try:
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(p.pid for p in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self) -> None:
        procs = [psutil.Process(pid) for pid in self.pids() if psutil.pid_exists(pid)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(timeout=10)


@dataclass
class LocalCluster:
    root: Path
    address: str
    env: dict[str, str]
    nodes: dict[str, Node] = field(default_factory=dict)

    def start_node(self, name: str, *args: str) -> Node:
        # Every port explicit and free: three nodes share this host (and other tests may run Ray).
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        # A temp dir per node, as on separate machines: nodes sharing one race for socket names.
        temp_dir = self.root / name
        cmd = [RAY, "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               "--object-store-memory=100000000", *(f"{p}={_free_port()}" for p in ports), *args]
        with open(self.root / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = node = Node(name, proc)
        return node

    def node_of(self, pid: int) -> str | None:
        return next((n.name for n in self.nodes.values() if pid in n.pids()), None)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Block until ``count`` nodes are alive, asked from a driver of its own (not this process)."""
        probe = ("import ray, time, sys\n"
                 "ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False)\n"
                 "t = time.time() + float(sys.argv[3])\n"
                 "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.time() < t:\n"
                 "    time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))\n")
        r = subprocess.run([sys.executable, "-c", probe, self.address, str(count), str(timeout)], env=self.env,
                           capture_output=True, text=True, timeout=timeout + 60, check=False)
        assert r.stdout.strip() == str(count), self.logs() + r.stderr[-2000:]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            procs = [psutil.Process(pid) for pid in node.pids() if psutil.pid_exists(pid)]
            if node.proc.poll() is None:
                node.proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
                try:
                    node.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                p.kill()
        # Anything left that this cluster started (an orphaned worker) names its private temp dir.
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.root) in a for a in (p.info["cmdline"] or [])):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster(tiny_model_dir):
    # A short private temp dir: Ray's unix sockets live under it (path length limit), and no
    # other test's ray.init() can find this cluster through the default /tmp/ray.
    root = Path(tempfile.mkdtemp(prefix="grpo-rc-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    gcs_port = _free_port()
    c = LocalCluster(root=root, address=f"127.0.0.1:{gcs_port}", env=env)
    try:
        c.start_node("head", "--head", f"--port={gcs_port}", "--num-cpus=0", "--include-dashboard=false")
        c.start_node("a", f"--address={c.address}", "--num-cpus=1", '--resources={"worker_a": 1}',
                     "--include-log-monitor=false")
        c.start_node("b", f"--address={c.address}", "--num-cpus=1", '--resources={"worker_b": 1}',
                     "--include-log-monitor=false")
        c.wait_for_nodes(3)
        yield c
    finally:
        c.stop()


def _spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "multinode"
    spec["grpo"]["max_steps"] = MAX_STEPS
    spec["search"] |= {"num_samples": 3, "max_concurrent_trials": 2, "max_failures": 2}
    spec["export"] = {"enabled": False}  # the export path is covered by test_sweep and test_s3
    path = tmp_path / "multinode.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _results(trial_dir: Path) -> list[dict]:
    rows = []
    for line in (trial_dir / "result.json").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            pass
    return rows


def test_sweep_survives_losing_a_worker_node(cluster, tmp_path):
    storage = tmp_path / "runs"
    env = cluster.env | {"RAY_ADDRESS": cluster.address, "GRPO_RAY_STORAGE": str(storage)}
    driver_log = tmp_path / "driver.log"
    t0 = time.time()
    with open(driver_log, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "grpo_ray.cli", "sweep", str(_spec(tmp_path))], cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = storage / "multinode"
    node_of_pid: dict[int, str] = {}
    killed_trial = None
    try:
        deadline = time.time() + 420
        while driver.poll() is None and time.time() < deadline:
            for trial_dir in run.glob("tune_trainable_*"):
                if not (trial_dir / "result.json").exists():
                    continue
                rows = _results(trial_dir)
                for r in rows:
                    if r["pid"] not in node_of_pid and (name := cluster.node_of(r["pid"])):
                        node_of_pid[r["pid"]] = name
                last = rows[-1] if rows else None
                if killed_trial is None and last and node_of_pid.get(last["pid"]) == "a" and last["step"] < MAX_STEPS:
                    cluster.nodes["a"].kill()  # mid-trial: reported step 2 of MAX_STEPS
                    killed_trial, killed_at = trial_dir, time.time() - t0
            time.sleep(0.1)
        driver.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    elapsed = time.time() - t0
    out = driver_log.read_text()
    assert driver.returncode == 0, out[-3000:] + cluster.logs()
    assert killed_trial is not None, f"no trial ran on worker a mid-way: {node_of_pid}\n{out[-2000:]}"

    # Every trial finished all its steps, the killed one included; nothing ran on the head.
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 and all(t["error"] is None and t["metrics"]["step"] == MAX_STEPS for t in trials)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["trials"] == {"total": 3, "errored": 0} and best["trial_id"] in {t["trial_id"] for t in trials}
    assert set(node_of_pid.values()) == {"a", "b"}, node_of_pid

    # The lost trial was retried (Tune counts the failure) and finished on the surviving node.
    from grpo_ray.views.status import read_status

    status = {s.trial_id: s for s in read_status(str(run))}
    killed_id = killed_trial.name.split("_")[2]
    assert status[killed_id].failures >= 1 and status[killed_id].status == "TERMINATED"
    rows = _results(killed_trial)
    assert node_of_pid[rows[0]["pid"]] == "a" and node_of_pid[rows[-1]["pid"]] == "b"
    assert rows[-1]["step"] == MAX_STEPS
    # The retry went on from the checkpoint node a reported, not from SFT: its first step on b
    # is the one after that checkpoint.
    on_b = [r for r in rows if node_of_pid[r["pid"]] == "b"]
    assert on_b[0]["resumed_from_step"] == rows[0]["step"] and on_b[0]["step"] > rows[0]["step"], rows
    print(f"\nsweep {elapsed:.0f} s, node a killed at {killed_at:.0f} s; retried trial steps by node: "
          f"{[(node_of_pid[r['pid']], r['step'], r['training_iteration']) for r in rows]}")
