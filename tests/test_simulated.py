"""The simulated SD3.5-M transformer (flowopd.simulated) and the simulated-cluster benchmark: delays follow
the latency model, LoRA detection, real LoRA gradients, loading through flowopd.models, and a short run of
`bench_opd --preset sim` on a local Ray. Delays are checked as computed and logged, never as wall time."""
import json
from pathlib import Path

import pytest
import ray
import torch

from flowopd.config import OPDConfig
from flowopd.models import (
    add_student_adapter,
    check_adapter_fits,
    encode_prompts,
    load_pipeline,
    load_transformer,
    lora_config,
    velocity,
)
from flowopd.simulated import LATENCY, SimulatedGPU, SimulatedTransformer, save_simulated_model
from pipelines import bench_opd
from world.tiny import make_random_adapter

SCALE = 0.01  # every delay x 0.01: the forward of 16 samples sleeps ~2 ms


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Simulated pipeline (2 blocks of width 32), three LoRA teachers and prompts, as the benchmark makes."""
    return bench_opd.sim_assets(tmp_path_factory.mktemp("sim_assets"), num_layers=2, width=32)


def logged(run_dir: Path) -> list[tuple[float, str]]:
    """(nominal seconds, kind) of every simulated call logged under run_dir, in order."""
    lines = [ln.split() for f in sorted(run_dir.glob("*.busy")) for ln in f.read_text().splitlines()]
    return [(float(s), kind) for _, _, s, kind, _ in sorted(lines)]


def student(run_dir, **kw):
    model = SimulatedTransformer(num_layers=2, width=32, time_scale=SCALE, run_dir=str(run_dir), **kw)
    return model, add_student_adapter(model, lora_config(4, 8))


def test_delays_follow_the_latency_model(tmp_path):
    model = SimulatedTransformer(num_layers=2, width=32, time_scale=SCALE)
    eager = LATENCY["eager"]
    assert model.delays(6, lora=False) == pytest.approx((6 * 9.5e-3 * SCALE, 6 * (33e-3 - 10.4e-3) * SCALE))
    assert model.delays(6, lora=True)[0] == pytest.approx(6 * eager["forward_lora"] * SCALE)
    model.compile()  # what model.compile=true does: compiled figures, no torch.compile
    fwd, bwd = model.delays(6, lora=True)
    assert fwd == pytest.approx(6 * 5.5e-3 * 10.4 / 9.5 * SCALE)
    assert fwd + bwd == pytest.approx(6 * 16.6e-3 * SCALE)
    assert model.delays(6, lora=False)[0] == pytest.approx(6 * 5.5e-3 * SCALE)


def test_lora_detection_and_cfg_batches_set_the_logged_delay(tmp_path):
    """A CFG velocity is one forward of twice the batch; LoRA latency only while the adapter applies."""
    model, peft = student(tmp_path / "run")
    x, e, p = torch.randn(3, 16, 8, 8), torch.randn(3, 5, 4096), torch.randn(3, 2048)
    ne, npl = torch.randn(1, 5, 4096), torch.randn(1, 2048)
    with torch.no_grad():
        velocity(peft, x, 0.5, e, p, ne, npl, 4.5)
        with peft.disable_adapter():
            velocity(peft, x, 0.5, e, p, ne, npl, 4.5)
        velocity(peft, x, 0.5, e, p)  # no CFG
    with_lora, without = model.delays(6, lora=True)[0], model.delays(6, lora=False)[0]
    assert logged(tmp_path / "run") == [(pytest.approx(with_lora), "forward"), (pytest.approx(without), "forward"),
                                        (pytest.approx(with_lora / 2), "forward")]


def test_gradients_reach_every_lora_weight_and_the_backward_is_delayed(tmp_path):
    model, peft = student(tmp_path / "run")
    for q in peft.parameters():
        if q.requires_grad:
            q.data.normal_()  # B = 0 at init would leave A without gradient, as in any LoRA
    x, e, p = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 4096), torch.randn(2, 2048)
    v = velocity(peft, x, 0.5, e, p, torch.randn(1, 5, 4096), torch.randn(1, 2048), 4.5)
    (v - torch.randn_like(v)).pow(2).mean().backward()
    lora = {n: q.grad for n, q in peft.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * (2 * 8 - 1)  # A and B of 8 projections per block, none for the last to_add_out
    assert all(g is not None and g.abs().sum() > 0 for g in lora.values())
    fwd, bwd = model.delays(4, lora=True)
    assert logged(tmp_path / "run") == [(pytest.approx(fwd), "forward"), (pytest.approx(bwd), "backward")]


def test_simulated_gpu_is_the_first_visible_device(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert SimulatedGPU(str(tmp_path)).id == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert SimulatedGPU(None).id.startswith("private")


def test_loads_through_flowopd_models_at_sd35m_sizes(assets, tmp_path):
    base = str(assets / "base")
    assert isinstance(load_transformer(base), SimulatedTransformer)
    pipe = load_pipeline(base)
    assert isinstance(pipe.transformer, SimulatedTransformer)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 16
    embeds, pooled = encode_prompts(pipe, ["a red cube", "a sign"], 256)
    assert embeds.shape == (2, 333, 4096) and pooled.shape == (2, 2048)
    check_adapter_fits(str(assets / "teachers" / "anchor"), base)
    other = tmp_path / "other"
    save_simulated_model(str(other), num_layers=2, width=48)
    make_random_adapter(str(other), tmp_path / "misfit", seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        check_adapter_fits(str(tmp_path / "misfit"), base)


def test_roles_are_sized_by_simulated_work(assets):
    cfg = OPDConfig.model_validate(bench_opd.sim_config(assets, assets / "out", {"rollout": 1, "pools": 1,
                                                                                 "learner": 1}, False, 1, 2))
    work = bench_opd.role_work(cfg, LATENCY)
    # per prompt: 24 samples x 10 steps x CFG; 216 trained states x (routed + MAR) x CFG; 216 x CFG fwd+bwd
    assert work["rollout"] == pytest.approx(24 * 10 * 2 * 10.4e-3)
    assert work["pools"] == pytest.approx(216 * 2 * 2 * 10.4e-3)
    assert work["learner"] == pytest.approx(216 * 2 * 33e-3)
    assert bench_opd.size_roles(8, work) == {"rollout": 2, "pools": 2, "learner": 4}
    assert bench_opd.size_roles(32, work) == {"rollout": 6, "pools": 10, "learner": 16}


def test_bench_sim_runs_on_a_local_ray_cluster(assets, tmp_path):
    """One simulated GPU hosting a rollout worker, a teacher server and a learner rank (colocated, sharing
    the GPU's lock), two steps of the real trainer; small groups keep it short, tensors stay SD3.5-M's."""
    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path / "bench"
    assert bench_opd.main(["--preset", "sim", "--gpus", "1", "--steps", "2", "--time-scale", str(SCALE),
                           "--assets", str(assets), "--out", str(out),
                           "data.group_size=2", "sampling.num_steps=3"]) == 0
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    assert row["placement"] == "single" and row["processes_per_gpu"] == [3]
    assert row["states_per_step"] == 2 * 2  # 2 samples x 2 trained steps of 3
    assert row["analytic_bound_s"] > 0 and row["busiest_s"] == pytest.approx(row["analytic_bound_s"])
    assert row["step_s"] > 0 and row["state_bytes"] > 0
    assert not ray.is_initialized()
