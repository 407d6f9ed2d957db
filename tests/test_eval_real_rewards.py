"""`pipelines.evaluate` end to end with real shipped scorers (OCR on rapidocr, BRISQUE) on the tiny model."""
import json

import pyarrow.parquet as pq
import ray
import yaml

from pipelines.evaluate import main as evaluate_main


def test_evaluate_with_ocr_and_brisque(tiny_assets, tmp_path):
    cfg = {"output_dir": str(tmp_path / "eval"),
           "model": {"base": str(tiny_assets / "base"), "max_sequence_length": 16, "resolution": 64},
           "models": {"base": {}, "ocr_teacher": {"adapter": str(tiny_assets / "teachers" / "ocr_teacher")}},
           "data": {"sources": [{"path": str(tiny_assets / "ocr_train.txt"), "format": "ocr"}],
                    "max_prompts_per_source": 3},
           "samples_per_prompt": 1, "sampling": {"num_steps": 8},
           "rewards": [{"name": "ocr", "num_cpus": 0.25}, {"name": "brisque", "num_cpus": 0.25}],
           "rollout": {"num_cpus": 0.25, "batch_size": 8}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    try:
        assert evaluate_main(["--config", str(tmp_path / "eval.yaml")]) == 0
    finally:
        ray.shutdown()
    table = pq.read_table(tmp_path / "eval" / "results.parquet").to_pydict()
    assert len(table["model"]) == 6
    assert {"ocr/ocr", "ocr/ocr_exact", "brisque/quality", "brisque/brisque"} <= set(table)
    assert all(0 <= v <= 1 for v in table["ocr/ocr"])  # random pixels read as little or no text
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"ocr/ocr", "brisque/quality"} <= set(summary["ocr_teacher"]["mean"])
    assert (tmp_path / "eval" / "grids" / "base" / "ocr.png").exists()
