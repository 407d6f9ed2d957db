"""AC-DMD (RTDMD stage 1) as a job: the fake score learns the generator's distribution, the job runs on a real
local Ray cluster and exports its adapters, resumes bit-identically, and survives its actors' deaths."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
from peft import PeftModel

from actors.dmd_trainer import DMDTrainer
from flowopd.config import ConfigError, DMDConfig, validate
from flowopd.flow import schedule_sigmas
from flowopd.learner import Learner
from flowopd.models import encode_prompts, load_pipeline
from flowopd.objectives import ACFakeScore
from flowopd.rollout import ac_states, sample_generators
from pipelines import dmd
from pipelines.preflight import preflight
from tests.conftest import checkpoint_at, run_job_command, tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(assets, out, **changes) -> DMDConfig:
    return DMDConfig.model_validate(tiny_config_dict(assets, out, config="tiny_dmd.yaml", **changes))


@pytest.fixture(scope="module")
def straight(tiny_assets, tmp_path_factory):
    """The output directory of an undisturbed run through the command line."""
    return run_job_command(dmd.main, tiny_assets, tmp_path_factory.mktemp("dmd_straight"), "tiny_dmd.yaml")


def _assert_same_checkpoint(a: dict, b: dict) -> None:
    for name, state in [("student", a["lora"]), *a["extra"].items()]:
        other = b["lora"] if name == "student" else b["extra"][name]
        for k in state:
            assert np.array_equal(state[k], other[k]), (name, k)
    fa, fb = a["extra_optimizers"]["fake_score"]["state"], b["extra_optimizers"]["fake_score"]["state"]
    for i in fa:
        assert all(np.array_equal(fa[i][k], fb[i][k]) for k in fa[i] if hasattr(fa[i][k], "shape")), i


def test_fake_score_learns_the_generator_distribution():
    """The fake score (initialised as the world base) trained on the samples of a 4-step generator (here the
    base with the style teacher's adapter): its flow-matching loss on fresh samples it never saw (the same ones
    before and after) falls."""
    base = str(ROOT / "assets" / "world" / "base")
    cfg = validate(DMDConfig, {"output_dir": "unused", "model": {"base": base, "resolution": 32},
                               "data": {"sources": [{"path": "unused", "format": "txt"}]},
                               "fake": {"learner": {"lr": 3e-3, "micro_batch_size": 16}}}, "test")
    learner = Learner(cfg.fake_job(), ACFakeScore(cfg.sampling.noise_level, consistency=0.0))
    pipe = load_pipeline(base)
    generator = PeftModel.from_pretrained(pipe.transformer, str(ROOT / "assets/world/stage1/style_teacher")).eval()
    sigmas = schedule_sigmas(4, 3.0, cfg.sampling.timesteps)
    records = [json.loads(line) for line in (ROOT / "assets/world/world_composition_train.jsonl").open()]
    neg = encode_prompts(pipe, [""], 40)

    def batch(key: int, n: int) -> dict:
        embeds, pooled = encode_prompts(pipe, [r["prompt"] for r in records[:n]], 40)
        st = ac_states(generator, embeds, pooled, sigmas, 0.9, 4, (4, 16, 16),
                       sample_generators(0, key, range(n), "cpu"), 200)
        return {**{k: v.numpy() for k, v in st.items() if k != "x"}, "x": st["x_t"].numpy(),
                "step_idx": np.full(n, 3), "prompt_idx": np.arange(n), "embeds": embeds.numpy(),
                "pooled": pooled.numpy(), "neg_embeds": neg[0].numpy(), "neg_pooled": neg[1].numpy()}

    held_out = batch(10 ** 6, 64)

    def loss() -> np.ndarray:
        v = learner.predict(held_out)
        return held_out["fm_weight"] * ((v - held_out["v_target"]) ** 2).reshape(len(v), -1).mean(1)

    before = loss()
    for step in range(15):
        learner.train_step(batch(step, 16), 16)
    after = loss()
    d = before - after
    assert d.mean() > 3 * d.std(ddof=1) / np.sqrt(len(d)), (before.mean(), after.mean())  # paired, t > 3


def test_job_trains_both_models_and_exports_them(straight, tiny_assets):
    out = straight
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    levels = {float(k) for m in lines for k in m["fm_loss_per_level"]}
    assert levels <= {0.9, 0.75, 0.5, 0.0} and len(levels) >= 2
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["fake_grad_norm"] > 0 for m in lines)
    assert all(m["consistency"] != 0 for m in lines)
    final = checkpoint_at(out, STEPS)
    assert set(final["extra"]) == {"ema", "fake_score"}
    for name, state in [("student", final["lora"]), ("fake_score", final["extra"]["fake_score"])]:
        assert any(np.abs(v).max() > 0 for k, v in state.items() if "lora_B" in k), f"{name} did not move"
    assert any(not np.array_equal(final["lora"][k], final["extra"]["ema"][k]) for k in final["lora"])
    from safetensors.numpy import load_file
    exported = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(exported[k], final["extra"]["ema"][k]) for k in exported)
    fake = load_file(str(out / "fake_score" / "adapter_model.safetensors"))
    assert all(np.array_equal(fake[k], final["extra"]["fake_score"][k]) for k in fake)


class KillingDMDTrainer(DMDTrainer):
    """SIGKILLs an actor's process before chosen steps, each once."""

    def __init__(self, cfg, sources, kills: dict):
        self.kills = dict(kills)
        super().__init__(cfg, sources)

    def train_step(self) -> dict:
        victim = self.kills.pop(self.step_done + 1, None)
        if victim is not None:
            os.kill(ray.get(victim(self).remote()), signal.SIGKILL)
        return super().train_step()


def test_killed_fake_score_rank_and_rollout_worker_are_rebuilt_bit_identically(straight, tiny_assets, tmp_path):
    """A fake-score rank and a rollout worker die by SIGKILL; each time the job rebuilds what died, reloads the
    newest checkpoint (generator, its EMA, the fake score and both optimizers) and goes on: it ends bit for bit
    where the undisturbed run does, so resuming from a checkpoint is exact too."""
    out = straight
    cfg = _config(tiny_assets, tmp_path)
    tr = KillingDMDTrainer(cfg, preflight(cfg), {4: lambda t: t.fake.ranks[1].pid, 6: lambda t: t.workers[0].pid})
    try:
        tr.run(progress=False)
    finally:
        tr.shutdown()
    assert not tr.kills
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["role"], e["steps_done"], e["step"], e["restarted"]) for e in events] == [
        ("fake-score rank", 3, 2, "the teacher replica actors and fake-score rank actors"),
        ("rollout worker", 5, 4, "that rollout worker")]
    _assert_same_checkpoint(checkpoint_at(out, STEPS), checkpoint_at(tmp_path, STEPS))


@pytest.mark.parametrize("change, key", [({"teachers": {"teacher": {}}}, "teachers"),
                                         ({"sampling": {"num_steps": 10}}, "sampling"),
                                         ({"sampling": {"timesteps": [250, 500]}}, "timesteps")])
def test_config_errors_name_the_key(tiny_assets, tmp_path, change, key):
    raw = {**tiny_config_dict(tiny_assets, tmp_path, config="tiny_dmd.yaml"), **change}
    with pytest.raises(ConfigError, match=key):
        validate(DMDConfig, raw, "job.yaml")
