"""The worked example of docs/extending.md, run as it stands: a new objective, config and trainer."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config_dict, velocity_gaps

ROOT = Path(__file__).resolve().parents[1]


def _example_module(tmp_path):
    doc = (ROOT / "docs" / "extending.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    path = tmp_path / "velocity_distillation.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("velocity_distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worked_example_trains_the_student_toward_its_one_teacher(tiny_assets, tmp_path):
    ex = _example_module(tmp_path)
    raw = tiny_config_dict(tiny_assets, tmp_path / "out", **{
        "route": {"geneval": "geneval_teacher", "ocr": "geneval_teacher"}, "mar": {"teacher": None},
        "distill": {"weighting": "uniform"}, "train.steps": 8, "train.checkpoint_every": 8,
        "learner.ranks": 1, "rollout.workers": 1})
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert ex.main(["--config", str(cfg), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(m["mar_loss"] is None for m in lines)
    before = velocity_gaps(tiny_assets, None)
    after = velocity_gaps(tiny_assets, tmp_path / "out" / "checkpoints" / "step_00000008" / "student")
    for task in ("geneval", "ocr"):  # both tasks were routed to the one teacher
        assert after[(task, "geneval_teacher")] < 0.9 * before[(task, "geneval_teacher")], (task, before, after)


def test_worked_example_config_refuses_two_teachers(tmp_path):
    ex = _example_module(tmp_path)
    raw = yaml.safe_load((ROOT / "configs" / "tiny_opd.yaml").read_text())
    raw.pop("tiny_assets")
    with pytest.raises(ValueError, match="route: velocity distillation routes every task to one teacher"):
        ex.VelocityDistillationConfig.model_validate(raw)
