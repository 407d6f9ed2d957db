"""Stage 1 as one job on the tiny model: two teachers, GRPO-Mix, a two-step cascade and the evaluation,
published with a manifest; and an evaluation that reuses the published scores only when this machine
reproduces them."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from flowopd.config import EvalConfig
from pipelines import stage1
from pipelines.evaluate import evaluate, preflight_eval
from pipelines.launch import init_ray
from tests.conftest import ROOT


def _stage1_recipe(tiny_assets, out) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny_recipe.yaml").read_text())
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("runs/tiny_assets", str(tiny_assets)))
    for key in ("cold_start", "opd", "opd_without_mar"):
        raw.pop(key)
    raw.update(tiny_assets=None, output_dir=str(out))
    train = {"steps": 1, "checkpoint_every": 1}
    raw["teachers"]["geneval_teacher"]["grpo"]["train"] = train
    raw["teachers"]["geneval_teacher"]["grpo"]["data"]["group_size"] = 4
    raw["teachers"]["geneval_teacher"]["grpo"]["probe"] = {
        "sources": [{"path": str(tiny_assets / "geneval_train.jsonl"), "format": "geneval"}],
        "max_prompts_per_source": 2, "samples_per_prompt": 2, "every": 1}
    raw["teachers"]["ocr_teacher"] = {"grpo": {
        "data": {"sources": [{"path": str(tiny_assets / "ocr_train.txt"), "format": "ocr"}], "prompts_per_step": 4,
                 "group_size": 4},
        "rewards": [{"name": "contrast", "num_cpus": 0.25}], "train": train}}
    raw["grpo_mix"]["data"]["group_size"] = 4
    raw["grpo_mix"]["train"] = {"steps": 2, "checkpoint_every": 2}  # alternate: one step on each task
    raw["cascade"] = {"order": ["geneval_teacher", "ocr_teacher"]}
    raw["evaluate"].update(samples_per_prompt={"geneval": 2, "ocr": 1}, sampling={"num_steps": 6})
    return raw


def test_stage1_trains_publishes_and_its_scores_are_reused(tiny_assets, tmp_path, capfd):
    cfg = tmp_path / "stage1.yaml"
    cfg.write_text(yaml.safe_dump(_stage1_recipe(tiny_assets, tmp_path / "work")))
    dest = tmp_path / "published"
    # a time limit that has passed: nothing starts, nothing is published, and the same command goes on later
    assert stage1.main(["--config", str(cfg), "--output", str(dest), "--no-progress", "--time-limit", "0"]) == 3
    assert not dest.exists() and not list((tmp_path / "work").rglob("DONE.json"))
    assert stage1.main(["--config", str(cfg), "--output", str(dest), "--no-progress"]) == 0
    man = json.loads((dest / "manifest.json").read_text())
    assert set(man["models"]) == {"geneval_teacher", "ocr_teacher", "anchor", "grpo_mix", "cascade"}
    for name in man["models"]:
        assert (dest / name / "adapter_model.safetensors").exists()
    m = man["models"]
    # budgets: each teacher 1 step x 4 prompts x 4; the cascade spends what its two teachers spend
    assert m["geneval_teacher"]["samples"] == m["ocr_teacher"]["samples"] == 16
    assert m["cascade"]["samples"] == 32 and m["cascade"]["stages"] == ["cascade/1_geneval_teacher",
                                                                       "cascade/2_ocr_teacher"]
    assert m["grpo_mix"]["samples"] == 2 * 4 * 4
    assert m["cascade"]["settings"]["cascade/2_ocr_teacher"]["student"]["init_adapter"].endswith(
        "cascade/1_geneval_teacher/adapter")
    rows = man["evaluation"]["rows"]
    assert set(rows) == {"base", *man["models"]} and all(0 <= r["average"]["mean"] <= 1 for r in rows.values())
    assert any("geneval: geneval_teacher − base" in c for c in man["claims"])
    assert (dest / "curves.png").stat().st_size > 1000
    # the teacher with a probe, and the cascade stage trained with its settings: held-out reward at steps 0, 1
    assert sorted(man["probe_curves"]) == ["cascade/1_geneval_teacher", "teachers/geneval_teacher"]
    for probe in man["probe_curves"].values():
        assert [p["step"] for p in probe] == [0, 1] and probe[1]["samples"] == 16
        assert {"geneval", "geneval_gain"} <= set(probe[1])
    assert (dest / "probe.png").stat().st_size > 1000
    assert stage1.main(["--config", str(cfg), "--output", str(dest), "--no-progress"]) == 2  # no --force

    # an evaluation with the same settings takes the published rows of the same weights, under any name
    ev = yaml.safe_load(cfg.read_text())["evaluate"]
    ev.update(output_dir=str(tmp_path / "again"), seed=0, model=_stage1_recipe(tiny_assets, tmp_path)["defaults"]["model"],
              rollout={"workers": 1, "num_cpus": 0.25, "batch_size": 32}, reuse=str(dest / "evaluation"),
              models={"base": {}, "renamed": {"adapter": str(dest / "geneval_teacher")}})
    ev_cfg = EvalConfig.model_validate(ev)
    init_ray(None)
    capfd.readouterr()
    evaluate(ev_cfg, preflight_eval(ev_cfg))
    err = capfd.readouterr().err
    assert "renamed: 18 rows reused" in err and "base: 18 rows reused" in err
    old, new = (pq.read_table(d / "results.parquet").to_pydict() for d in (dest / "evaluation", tmp_path / "again"))
    mine = np.asarray(old["model"]) == "geneval_teacher"
    np.testing.assert_array_equal(np.asarray(new["brightness/brightness"])[np.asarray(new["model"]) == "renamed"],
                                  np.asarray(old["brightness/brightness"])[mine])

    # scores that this machine does not reproduce are not trusted: everything is sampled again
    table = pq.read_table(dest / "evaluation" / "results.parquet")
    bright = np.asarray(table["brightness/brightness"].to_pylist(), dtype=float)
    pq.write_table(table.set_column(table.column_names.index("brightness/brightness"), "brightness/brightness",
                                    [(bright + 0.5).tolist()]), dest / "evaluation" / "results.parquet")
    evaluate(ev_cfg.model_copy(update={"output_dir": str(tmp_path / "third")}), preflight_eval(ev_cfg))
    err = capfd.readouterr().err
    assert "do not reproduce" in err and "rows reused" not in err


def test_cascade_needs_trained_teachers(tiny_assets, tmp_path):
    from flowopd.config import ConfigError
    from pipelines.recipe import Recipe
    raw = _stage1_recipe(tiny_assets, tmp_path)
    raw["cascade"] = {"order": ["geneval_teacher", "anchor"]}
    with pytest.raises(ConfigError, match="cascade.order: 'anchor' is not a teacher trained here"):
        Recipe(raw)
    raw["cascade"] = {}
    Recipe(raw)  # an empty section is no cascade
