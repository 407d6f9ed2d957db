"""The demo (README's main command), shortened: every stage runs on the shipped world model on a local Ray
cluster and the report holds a Table-2 row per model, the training curves and the sample grids."""
import json

import numpy as np
import yaml

from pipelines import demo
from pipelines.recipe import Recipe
from tests.conftest import ROOT


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--no-progress", f"output_dir={out}"]) == 0
    stages = ["teachers/composition_teacher", "teachers/text_teacher", "teachers/style_teacher", "grpo_mix",
              "cold_start", "opd_without_mar", "opd", "evaluate"]
    assert all((out / s / "DONE.json").exists() for s in stages)
    rows = json.loads((out / "report" / "table.json").read_text())
    assert list(rows) == ["base", "composition_teacher", "text_teacher", "style_teacher", "grpo_mix",
                          "cold_start", "opd_without_mar", "opd"]
    for name, r in rows.items():
        assert set(r) == {"composition", "text", "style", "average"}
        assert all(0.0 <= v <= 1.0 for v in r.values()), (name, r)
        assert np.isclose(r["average"], np.mean([r["composition"], r["text"], r["style"]]))
    report = (out / "report" / "report.md").read_text()
    assert "| opd |" in report and "GRPO-Mix" in report and "text: OPD" in report
    for f in ("curves.png", "grid_composition.png", "grid_text.png", "grid_style.png"):
        assert (out / "report" / f).stat().st_size > 1000, f
    opd = [json.loads(line) for line in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["reward_per_task"] and set(m["reward_per_task"]) <= {"composition", "text", "style"} for m in opd)
    assert "report:" in capsys.readouterr().out


def test_shipped_demo_configs_validate_and_their_prompt_files_read():
    for name in ("demo.yaml", "demo_gpu.yaml"):
        recipe = Recipe(yaml.safe_load((ROOT / "configs" / name).read_text()))
        recipe.check_data()
        assert set(recipe.stages["opd"].route) == {"composition", "text", "style"}, name
