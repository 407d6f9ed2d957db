"""The demo (README's main command) with the sample-efficiency comparison's additions, shortened: the shipped
stage-1 models, then cold start, OPD with and without MAR, DiffusionOPD, SFT on teacher samples and the
evaluation (OPD checkpoints included) on a local Ray cluster; the report holds a row per model with CIs,
every claim with its interval, the training curves, the labelled sample grids and reward against samples."""
import json
from pathlib import Path

import numpy as np
import yaml

from flowopd.checkpoint import CheckpointManager
from pipelines import compare
from pipelines.recipe import Recipe
from tests.conftest import ROOT

ROWS = ["base", "composition_teacher", "text_teacher", "style_teacher", "grpo_mix", "cascade", "cold_start", "sft",
        "opd_without_mar", "diffusionopd", "opd"]


def test_quick_demo_with_the_comparison_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert compare.main(["--quick", "--no-progress", f"output_dir={out}"]) == 0
    assert all((out / s / "DONE.json").exists()
               for s in ["cold_start", "opd_without_mar", "diffusionopd", "opd", "sft", "evaluate"])
    assert not (out / "teachers").exists()  # stage 1 is shipped, not retrained
    rows = json.loads((out / "report" / "table.json").read_text())
    assert list(rows) == ROWS
    for name, r in rows.items():
        assert set(r) == {"composition", "text", "style", "average"}
        assert all(0.0 <= c["lo"] <= c["mean"] <= c["hi"] <= 1.0 for c in r.values()), (name, r)
        assert np.isclose(r["average"]["mean"], np.mean([r[t]["mean"] for t in ("composition", "text", "style")]))
    report = (out / "report" / "report.md").read_text()
    for claim in ("composition: composition_teacher − base", "text: opd − text_teacher", "average: opd − grpo_mix",
                  "average: opd − cascade", "average: opd − opd_without_mar", "text: diffusionopd − text_teacher",
                  "average: diffusionopd − grpo_mix", "average: opd_without_mar − diffusionopd"):
        assert claim in report, claim
    assert "95% CI" in report
    for f in ("curves.png", "grid_composition.png", "grid_text.png", "grid_style.png"):
        assert (out / "report" / f).stat().st_size > 1000, f
    opd = [json.loads(line) for line in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["reward_per_task"] and set(m["reward_per_task"]) <= {"composition", "text", "style"} for m in opd)
    done = json.loads((out / "diffusionopd" / "DONE.json").read_text())
    ode = CheckpointManager.load(Path(done["final_checkpoint"]))["trainer_state"]["config"]
    assert done["steps"] == 2 and ode["sampling"]["noise_level"] == 0 and ode["mar"]["teacher"] is None
    dopd = [json.loads(line) for line in (out / "diffusionopd" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["mar_loss"] is None and np.isfinite(m["loss"]) for m in dopd)
    assert "report:" in capsys.readouterr().err

    # reward against samples: stage-1 budgets from the shipped manifest; --quick OPD steps are 3 prompts x 4
    manifest = json.loads((ROOT / "assets" / "world" / "stage1" / "manifest.json").read_text())["models"]
    teachers = sum(manifest[t]["samples"] for t in ("composition_teacher", "text_teacher", "style_teacher"))
    train_prompts = sum(len((ROOT / "assets" / "world" / f"world_{t}_train.jsonl").read_text().splitlines())
                        for t in ("composition", "text", "style"))
    eff = json.loads((out / "report" / "efficiency.json").read_text())["methods"]
    for method, stage in (("Flow-OPD (SDE, MAR)", "opd"), ("DiffusionOPD (ODE)", "diffusionopd")):
        assert [(p["model"], p["samples"]) for p in eff[method]] == [
            ("cold_start", teachers), (f"{stage}@1", teachers + 12), (stage, teachers + 24)]
    assert [(p["model"], p["samples"]) for p in eff["SFT on teacher samples"]] == [("sft", teachers + train_prompts)]
    assert [(p["model"], p["samples"]) for p in eff["GRPO-Mix"]] == [("base", 0), ("grpo_mix", manifest["grpo_mix"]["samples"])]
    index = json.loads((out / "evaluate" / "index.json").read_text())["models"]
    assert index["opd@1"] != index["opd"]  # the step-1 checkpoint's weights, not the final ones
    report = (out / "report" / "report.md").read_text()
    assert "## Sample efficiency" in report and "average: sft − grpo_mix" in report
    assert (out / "report" / "efficiency.png").stat().st_size > 1000


def test_demo_and_stage1_configs_validate_and_share_one_evaluation():
    """The demo reuses the shipped stage-1 scores only if both evaluate with the same settings."""
    demo_raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    stage1_raw = yaml.safe_load((ROOT / "configs" / "world_stage1.yaml").read_text())
    assert demo_raw["evaluate"]["reuse"] == "assets/world/stage1/evaluation"
    assert {k: v for k, v in demo_raw["evaluate"].items() if k != "reuse"} == stage1_raw["evaluate"]
    for raw in (demo_raw, stage1_raw, yaml.safe_load((ROOT / "configs" / "demo_gpu.yaml").read_text())):
        Recipe(raw).check_data()
    recipe = Recipe(demo_raw)
    assert set(recipe.stages["opd"].route) == {"composition", "text", "style"}
    shipped = ROOT / "assets" / "world" / "stage1"
    for name in recipe.teachers:
        assert (shipped / name / "adapter_model.safetensors").exists(), name
    manifest = json.loads((shipped / "manifest.json").read_text())
    teachers = sum(manifest["models"][t]["samples"] for t in recipe.teachers)
    assert manifest["models"]["grpo_mix"]["samples"] == manifest["models"]["cascade"]["samples"] == teachers
    from pipelines.evaluate import load_prompts, settings_fingerprint
    ev = recipe.stages["evaluate"]
    index = json.loads((shipped / "evaluation" / "index.json").read_text())
    assert settings_fingerprint(ev, load_prompts(ev)) == index["settings"]  # same prompts, seeds, sampler, base


def test_retrained_grpo_mix_has_the_shipped_settings_and_points_along_its_budget():
    """--retrain-grpo-mix trains GRPO-Mix as stage 1 did (only its checkpoints differ) and draws it at thirds."""
    from argparse import Namespace

    from pipelines.recipe import load_recipe
    from pipelines.stage1 import stage_settings
    args = Namespace(quick=False, retrain_grpo_mix=True)
    recipe = load_recipe(str(ROOT / "configs" / "demo.yaml"), [], lambda raw: compare.additions(raw, args))
    shipped = json.loads((ROOT / "assets" / "world" / "stage1" / "manifest.json").read_text())["models"]["grpo_mix"]
    mine, theirs = stage_settings(recipe.stages["grpo_mix"]), shipped["settings"]["grpo_mix"]
    assert mine["train"].pop("checkpoint_every") == 30 and theirs["train"].pop("checkpoint_every") == 5
    mine["train"].pop("keep_checkpoints"), theirs["train"].pop("keep_checkpoints")

    def known(a, b):  # a's entries under b's keys: keys added since the shipped run are at their defaults
        return {k: known(a[k], v) if isinstance(v, dict) else a[k] for k, v in b.items()}
    assert known(mine, theirs) == theirs
    assert mine["sampling"]["sde_window_size"] == 0 and not mine["sampling"]["same_latent"]
    points = compare.efficiency_points(recipe)["GRPO-Mix"]
    assert points == [("base", 0), ("grpo_mix@30", 7680), ("grpo_mix@60", 15360), ("grpo_mix", shipped["samples"])]
    assert recipe.stages["evaluate"].models["grpo_mix@60"].adapter.endswith("grpo_mix/checkpoints/step_00000060/ema")


def test_few_step_job_trains_evaluates_and_reports(tmp_path):
    """python -m pipelines.few_step --quick: AC-DMD for 2 steps from the shipped base, RTDMD for 2 steps from its
    exports, then the base at 20 and at 4 steps and both generators on the same held-out prompts and seeds,
    and a report with paired CIs."""
    from pipelines import few_step
    out = tmp_path / "few"
    assert few_step.main(["--quick", "--no-progress", f"output_dir={out}"]) == 0
    report = (out / "report.md").read_text()
    for name in ("base_20", "base_4", "ac_dmd_4", "rtdmd_4"):
        assert f"| {name} |" in report
    assert "ac_dmd_4 reaches" in report and "average: ac_dmd_4 − base_4" in report
    assert "style: rtdmd_4 − ac_dmd_4" in report
    index = json.loads((out / "evaluate" / "index.json").read_text())
    assert len(set(index["models"].values())) == 4  # three samplers of the base weights, and the tilted generator
    for stage in ("ac_dmd", "rtdmd"):
        assert (out / stage / "DONE.json").exists() and (out / stage / "fake_score").is_dir()
    tilt = json.loads((out / "rtdmd" / "metrics.jsonl").read_text().splitlines()[0])
    assert tilt["samples"] == 16 and tilt["bp_reward"] > 0  # 4 style prompts x 4, saturation back-propagated
    assert few_step.main(["--quick", "--no-progress", f"output_dir={out}"]) == 0  # finished stages are kept
