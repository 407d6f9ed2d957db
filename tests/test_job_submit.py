"""`ray job submit` of the tiny config against a `ray start --head` cluster with token auth on."""
import json
import os
import socket
import subprocess
import sys
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
    env = dict(os.environ, RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).parent / "ray")
    dash = _free_port()
    subprocess.run([ray_bin, "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dash}",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        yield env, ray_bin, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], check=False, env=env, capture_output=True)


def test_ray_job_submit_runs_tiny_config(head_node, tiny_assets, tmp_path):
    env, ray_bin, address = head_node
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, out)))
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "-m", "pipelines.opd", "--config", str(config), "--no-progress",
           "train.steps=3", "train.checkpoint_every=2"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "student" / "adapter_model.safetensors").exists()
