"""Checkpoints round-trip exactly, and a crash while writing never damages the previous one."""
import json

import numpy as np
import pytest
import torch

import flowopd.checkpoint as ckpt_mod
from flowopd.checkpoint import CheckpointManager
from flowopd.models import lora_config


def _state(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    lora = {"base_model.model.a.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32)}
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(3)
    opt.step()
    return lora, opt.state_dict()


def test_roundtrip_and_pruning(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        lora, opt = _state(step)
        m.save(step, lora, lora_config(4, 8), opt, {"sampler": {"x": step}})
    assert [p.name for p in m.complete()] == ["step_00000002", "step_00000003"]
    loaded = CheckpointManager.load(m.latest())
    assert np.array_equal(loaded["lora"]["base_model.model.a.lora_A.weight"],
                          _state(3)[0]["base_model.model.a.lora_A.weight"])
    assert loaded["trainer_state"] == {"sampler": {"x": 3}, "step": 3}
    want = _state(3)[1]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], want["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    assert (m.latest() / "student" / "adapter_config.json").exists()


def test_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep=3)
    lora, opt = _state(1)
    m.save(1, lora, lora_config(4, 8), opt, {})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save(2, *_state(2)[:1], lora_config(4, 8), _state(2)[1], {})
    assert m.latest().name == "step_00000001"
    assert CheckpointManager.load(m.latest())["trainer_state"]["step"] == 1


def test_latest_pointer_is_not_trusted_blindly(tmp_path):
    m = CheckpointManager(tmp_path)
    lora, opt = _state(1)
    m.save(1, lora, lora_config(4, 8), opt, {})
    (tmp_path / "latest").write_text(json.dumps({"dir": "step_00000099"}))
    assert m.latest().name == "step_00000001"
    (tmp_path / "latest").write_text("garbage")
    assert m.latest().name == "step_00000001"
