"""Experiment tracking: flattened keys, and TensorBoard event files read back (with a resumed run purging
what the lost run logged after its checkpoint)."""
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowopd.config import ConfigError, LoggerConfig
from flowopd.tracking import flatten, make_tracker


def test_flatten_names_and_skips_what_is_not_a_number():
    m = {"step": 3, "loss": 0.5, "task_loss": 0.4, "mar_loss": None, "time": {"rollout": 1.5, "learn": 2.0},
         "reward_per_task": {"text": 0.3}, "loss_per_step": [1.0, float("nan"), 3.0], "note": "x",
         "rewards": {"ocr": {"ocr": 0.2}}, "skipped": True, "states": np.int64(7)}
    assert flatten(m) == {"loss/total": 0.5, "loss/task": 0.4, "time/rollout": 1.5, "time/learn": 2.0,
                          "reward/text": 0.3, "loss_step/0": 1.0, "loss_step/2": 3.0, "reward_output/ocr/ocr": 0.2,
                          "skipped": 1.0, "states": 7.0}


def _scalars(path):
    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_events_read_back_and_resume_purges(tmp_path):
    cfg = LoggerConfig(backend="tensorboard")
    assert make_tracker(LoggerConfig(), str(tmp_path)) is None  # JSONL only by default
    first = make_tracker(cfg, str(tmp_path))
    for step in (1, 2, 3):
        first.log({"step": step, "task_loss": float(step), "reward_per_task": {"text": step / 10}}, step)
    first.log_image("grids/base/text", np.zeros((4, 8, 3), np.uint8))
    first.close()
    again = make_tracker(cfg, str(tmp_path), resume_step=1)  # the run died after its step-1 checkpoint
    for step in (2, 3):
        again.log({"step": step, "task_loss": 10.0 * step}, step)
    again.close()
    scalars, acc = _scalars(tmp_path / "tensorboard")
    assert scalars["loss/task"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert [s for s, _ in scalars["reward/text"]] == [1]
    assert "grids/base/text" in acc.Tags()["images"]


def test_a_missing_backend_is_named_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    from pipelines.preflight import check_logger
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))

    class Cfg:
        logger = LoggerConfig(backend="wandb")
    with pytest.raises(ConfigError, match=r"logger\.backend: wandb needs the 'wandb' package"):
        check_logger(Cfg())
