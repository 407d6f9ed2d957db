"""The whole recipe on the tiny model: killed during OPD, started again, it resumes there without redoing
or rewriting any finished stage, and ends with an evaluation row per model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flowopd.config import ConfigError
from pipelines.recipe import Recipe
from tests.conftest import ROOT


def _recipe(tiny_assets, out) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny_recipe.yaml").read_text())
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("runs/tiny_assets", str(tiny_assets)))
    raw.update(tiny_assets=None, output_dir=str(out), opd_without_mar=False)
    raw["teachers"]["geneval_teacher"]["grpo"]["train"] = {"steps": 1, "checkpoint_every": 1}
    # GRPO-Mix training is covered by tests/test_stage1.py: here a given baseline (one stage fewer to start)
    raw["grpo_mix"] = {"adapter": str(tiny_assets / "teachers" / "anchor")}
    raw["opd"]["train"] = {"steps": 5, "checkpoint_every": 1}
    raw["evaluate"].update(samples_per_prompt=1, sampling={"num_steps": 4})
    raw["evaluate"]["data"]["max_prompts_per_source"] = 2
    return raw


def test_recipe_config_errors_name_the_stage(tiny_assets, tmp_path):
    raw = _recipe(tiny_assets, tmp_path)
    Recipe(raw)  # valid
    bad = dict(raw, opd=dict(raw["opd"], route={"geneval": "nobody"}))
    with pytest.raises(ConfigError, match=r"recipe stage opd: invalid configuration\n.*route\.geneval: teacher 'nobody'"):
        Recipe(bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        Recipe(dict(raw, stage_zero=1))
    # curves: every OPD checkpoint before the last is evaluated too, so all of them must be kept
    recipe = Recipe(dict(raw, curves=True, sft=True, opd=dict(raw["opd"], train={"steps": 6, "checkpoint_every": 2})))
    models = recipe.stages["evaluate"].models
    assert recipe.curve_points() == [("opd", 2), ("opd", 4)]
    assert models["opd@4"].adapter == str(tmp_path / "opd" / "checkpoints" / "step_00000004" / "student")
    assert models["sft"].adapter == str(tmp_path / "sft" / "adapter")
    assert recipe.stages["sft"].route == recipe.stages["opd"].route and recipe.stages["sft"].method == "sft"
    sft_start = Recipe(dict(raw, cold_start={"method": "sft"}))  # the OPD student starts from the SFT adapter
    assert sft_start.stages["cold_start"].route == raw["opd"]["route"]
    assert sft_start.stages["opd"].student.init_adapter == str(tmp_path / "cold_start" / "adapter")
    with pytest.raises(ConfigError, match="opd.train.keep_checkpoints: curves need all 4"):
        Recipe(dict(raw, curves=True, opd=dict(raw["opd"], train={"steps": 8, "checkpoint_every": 2})))
    with pytest.raises(ConfigError, match="sft: these need an `opd:` section"):
        Recipe({k: v for k, v in raw.items() if k not in ("opd", "opd_without_mar")} | {"sft": True})


def test_recipe_resumes_after_a_kill_during_opd(tiny_assets, tmp_path):
    out = tmp_path / "recipe"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tiny_assets, out)))
    cmd = [sys.executable, "-m", "pipelines.recipe", "--config", str(cfg), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "opd" / "checkpoints" / "step_00000002"
    deadline = time.time() + 420
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the recipe did not reach the OPD stage"
    assert not (out / "opd" / "DONE.json").exists()
    finished = ["teachers/geneval_teacher", "cold_start"]
    stamps = {p: p.stat().st_mtime_ns for s in finished for p in (out / s).rglob("*") if p.is_file()}
    assert all((out / s / "DONE.json").exists() for s in finished)

    again = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for s in finished:
        assert f"[recipe] {s}: finished earlier, skipped" in again.stderr
    assert "resumed at step" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing finished was rewritten
    steps = [json.loads(x)["step"] for x in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 6))
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    assert set(summary) == {"base", "geneval_teacher", "ocr_teacher", "anchor", "grpo_mix", "cold_start", "opd"}
    assert all(summary[m]["mean"] for m in summary)
