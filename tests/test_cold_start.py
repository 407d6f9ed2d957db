"""Cold start: weight-space merges against the exact sum of the teachers' updates, and SFT plumbing."""
import json

import numpy as np
import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file

from actors.sampler import Sampler
from flowopd.config import ColdStartConfig
from flowopd.merge import delta, exact_delta, load_teachers, merge, normalise_weights, relative_error
from flowopd.models import load_transformer
from pipelines.cold_start import main as cold_start_main
from pipelines.launch import load_job
from tests.conftest import ROOT
from world.tiny import GENEVAL, OCR, make_random_adapter


@pytest.fixture
def teachers(tiny_assets):
    return {n: str(tiny_assets / "teachers" / n) for n in ("geneval_teacher", "ocr_teacher")}


def test_exact_merge_reproduces_weighted_delta(tiny_assets, teachers, tmp_path):
    base = str(tiny_assets / "base")
    w = [0.7, 0.3]
    report = merge(base, teachers, w, "cat", str(tmp_path / "cat"))
    model = load_teachers(base, {**teachers, "merged": str(tmp_path / "cat")})
    want = exact_delta(model, list(teachers), w)
    got = delta(model, "merged")
    assert report["relative_error"] < 1e-6 and relative_error(got, want) < 1e-6
    assert report["rank"] == 8  # 4 + 4


def test_svd_error_shrinks_with_rank_and_factor_averaging_differs(tiny_assets, teachers, tmp_path):
    base = str(tiny_assets / "base")
    errors = [merge(base, teachers, [0.5, 0.5], "svd", str(tmp_path / f"svd{r}"), rank=r)["relative_error"]
              for r in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3 and errors[-1] < 1e-5
    linear = merge(base, teachers, [0.5, 0.5], "linear", str(tmp_path / "linear"))
    assert linear["relative_error"] > 0.3  # mean(B) mean(A) is not mean(B A)


def test_fuse_writes_base_plus_exact_delta(tiny_assets, teachers, tmp_path):
    base = str(tiny_assets / "base")
    merge(base, teachers, [0.5, 0.5], "fuse", str(tmp_path / "fused"))
    model = load_teachers(base, teachers)
    want = exact_delta(model, list(teachers), [0.5, 0.5])
    fused = dict(load_transformer(str(tmp_path / "fused")).named_parameters())
    plain = dict(load_transformer(base).named_parameters())
    for mod, d in want.items():
        name = mod.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(fused[name] - plain[name], d, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "fused" / "text_encoder").is_symlink()


def test_merge_inputs_are_checked(tiny_assets, teachers, tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        normalise_weights([1.0, -1.0])
    assert normalise_weights([2.0, 2.0]) == [0.5, 0.5]
    # teachers of different ranks: exact merges handle them, factor averaging says why not
    make_random_adapter(str(tiny_assets / "base"), tmp_path / "r2", seed=9, rank=2)
    mixed = {"a": teachers["ocr_teacher"], "b": str(tmp_path / "r2")}
    assert merge(str(tiny_assets / "base"), mixed, [0.5, 0.5], "cat", str(tmp_path / "ok"))["rank"] == 6
    with pytest.raises(ValueError, match="equal ranks"):
        merge(str(tiny_assets / "base"), mixed, [0.5, 0.5], "linear", str(tmp_path / "no"))


def _write_cfg(tiny_assets, tmp_path, **changes):
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cold_start.yaml").read_text())
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("runs/tiny_assets", str(tiny_assets)))
    raw.update(tiny_assets=None, output_dir=str(tmp_path / "cs"), **changes)
    path = tmp_path / "cs.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_merge_never_overwrites_without_force(tiny_assets, tmp_path, capsys):
    path = _write_cfg(tiny_assets, tmp_path)
    assert cold_start_main(["--config", str(path)]) == 0
    adapter = tmp_path / "cs" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    assert cold_start_main(["--config", str(path)]) == 2
    assert "pass --force" in capsys.readouterr().err and adapter.stat().st_mtime_ns == before
    assert cold_start_main(["--config", str(path), "--force", "merge.weights={geneval_teacher: 3, ocr_teacher: 1}"]) == 0
    report = json.loads((tmp_path / "cs" / "adapter" / "merge_report.json").read_text())
    assert report["weights"] == {"geneval_teacher": 0.75, "ocr_teacher": 0.25}
    assert cold_start_main(["--config", str(path), "--force", "merge.weights={geneval_teacher: -1, ocr_teacher: 1}"]) == 2


def _sample_gaps(tiny_assets, student: str) -> dict:
    """Mean squared distance between the student's and each teacher's ODE samples (same prompts, seeds)."""
    cfg = load_job(str(ROOT / "configs" / "tiny_cold_start.yaml"),
                   ["tiny_assets=null", f"model.base={tiny_assets / 'base'}"], ColdStartConfig)
    models = {"student": {"adapter": student} if student else {},
              **{n: {"adapter": str(tiny_assets / "teachers" / n)} for n in ("geneval_teacher", "ocr_teacher")}}
    sampler = Sampler(cfg.model, models, cfg.sft.sampling, seed=123, batch_size=64)
    gaps = {}
    for task, prompts in (("geneval", [p for _, p in GENEVAL]), ("ocr", OCR)):
        many = [p for p in prompts for _ in range(8)]
        lat = {m: sampler.generate(m, many, list(range(len(many))), decode=False) for m in models}
        for t in ("geneval_teacher", "ocr_teacher"):
            gaps[(task, t)] = float(((lat["student"] - lat[t]) ** 2).mean())
    return gaps


def test_sft_moves_each_task_toward_its_teacher_and_resumes(tiny_assets, tmp_path):
    from pipelines.launch import init_ray
    init_ray(None)
    try:
        path = _write_cfg(tiny_assets, tmp_path, method="sft")
        assert cold_start_main(["--config", str(path), "--no-progress"]) == 0
        data = load_file(str(tmp_path / "cs" / "sft_data" / "data.safetensors"))
        assert data["x0"].shape == (12 * 4, 4, 8, 8) and torch.isfinite(data["x0"]).all()
        tasks = json.loads((tmp_path / "cs" / "sft_data" / "tasks.json").read_text())
        assert sorted(set(tasks)) == ["geneval", "ocr"]
        hist = [json.loads(x) for x in (tmp_path / "cs" / "metrics.jsonl").read_text().splitlines()]
        assert len(hist) == 40 and all(np.isfinite(m["loss"]) for m in hist)
        assert (tmp_path / "cs" / "adapter" / "adapter_config.json").exists()
        before, after = _sample_gaps(tiny_assets, None), _sample_gaps(tiny_assets, str(tmp_path / "cs" / "adapter"))
        for task, teacher in (("geneval", "geneval_teacher"), ("ocr", "ocr_teacher")):
            assert after[(task, teacher)] < 0.85 * before[(task, teacher)], (task, before, after)
        mtime = (tmp_path / "cs" / "sft_data" / "data.safetensors").stat().st_mtime_ns
        # resuming reuses the generated set and continues from the checkpoint
        assert cold_start_main(["--config", str(path), "--no-progress", "--force", "--resume", "train.steps=42"]) == 0
        assert (tmp_path / "cs" / "sft_data" / "data.safetensors").stat().st_mtime_ns == mtime
        assert len((tmp_path / "cs" / "metrics.jsonl").read_text().splitlines()) == 42
    finally:
        ray.shutdown()
