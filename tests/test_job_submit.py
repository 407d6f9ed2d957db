"""`ray job submit` of the tiny config against a `ray start --head` cluster with token auth on."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_config_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A head node of its own: `ray start --block` in a new process group, so the teardown stops this
    cluster only (`ray stop` would stop every Ray instance on the machine)."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).parent / "ray")
    dash = _free_port()
    # every fixed default port (the job agent's 52365 among them) is taken by any other Ray on this machine
    ports = [f"--{p}={_free_port()}" for p in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                               "runtime-env-agent-port", "metrics-export-port",
                                               "ray-client-server-port")]
    head = subprocess.Popen([ray_bin, "start", "--head", *ports, f"--dashboard-port={dash}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=true", "--disable-usage-stats", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield env, ray_bin, f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # a throwaway cluster: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _submit(cmd, env, deadline_s=180) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head is still starting (no dashboard or no job agent yet:
    nothing was submitted)."""
    deadline = time.time() + deadline_s
    while True:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
        starting = any(m in proc.stdout + proc.stderr for m in ("No available agent", "Failed to connect",
                                                                 "Connection refused"))
        if proc.returncode == 0 or not starting or time.time() > deadline:
            return proc
        time.sleep(2)


def test_ray_job_submit_runs_tiny_config(head_node, tiny_assets, tmp_path):
    env, ray_bin, address = head_node
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, out)))
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "-m", "pipelines.opd", "--config", str(config), "--no-progress",
           "train.steps=3", "train.checkpoint_every=2"]
    proc = _submit(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "student" / "adapter_model.safetensors").exists()
