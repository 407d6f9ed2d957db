"""RTDMD stage 2 as a job on a real local Ray cluster: SubGRPO, the fake score, the real and fake labels and
reward back-propagation in one generator step, exports, and a killed actor rebuilt bit-identically."""
import json
import os
import signal

import numpy as np
import pytest
import ray
from safetensors.numpy import load_file

from actors.rtdmd_trainer import RTDMDTrainer
from flowopd.config import RTDMDConfig
from pipelines import rtdmd
from pipelines.preflight import preflight
from tests.conftest import checkpoint_at, run_job_command, tiny_config_dict

STEPS = 4


pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def straight(tiny_assets, tmp_path_factory):
    """The output directory of an undisturbed run through the command line."""
    return run_job_command(rtdmd.main, tiny_assets, tmp_path_factory.mktemp("rtdmd_straight"), "tiny_rtdmd.yaml")


def test_job_trains_the_generator_and_the_fake_score(straight):
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert all(len(m["trained_steps"]) == 2 and set(m["trained_steps"]) <= {0, 1, 2} for m in lines)
    assert len({tuple(m["trained_steps"]) for m in lines}) >= 2  # drawn per step
    for m in lines:
        assert m["samples"] == 16 and m["states"] == 16 * 3  # two SubGRPO steps and the last step per sample
        assert m["first_ratio_dev"] < 1e-5  # one optimizer step per rollout: on-policy
        assert np.isfinite([m["loss"], m["dmd_loss"], m["fm_loss"]]).all() and m["dmd_loss"] > 0 and m["grad_norm"] > 0
        # the differentiable brightness of x0_hat is the reward actors' brightness of the same images (uint8)
        assert abs(m["bp_reward"] - m["reward_mean"]) < 0.01
    final = checkpoint_at(straight, STEPS)
    assert set(final["extra"]) == {"ema", "fake_score"} and final["trainer_state"]["optimizer_steps"] == STEPS
    for name, state in [("student", final["lora"]), ("fake_score", final["extra"]["fake_score"])]:
        assert any(np.abs(v).max() > 0 for k, v in state.items() if "lora_B" in k), f"{name} did not move"
    exported = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(exported[k], final["extra"]["ema"][k]) for k in exported)
    assert any(not np.array_equal(final["lora"][k], final["extra"]["ema"][k]) for k in final["lora"])
    fake = load_file(str(straight / "fake_score" / "adapter_model.safetensors"))
    assert all(np.array_equal(fake[k], final["extra"]["fake_score"][k]) for k in fake)


class KillingRTDMDTrainer(RTDMDTrainer):
    def __init__(self, cfg, sources, kill_before: int):
        self.kill_before = kill_before
        super().__init__(cfg, sources)

    def train_step(self) -> dict:
        if self.step_done + 1 == self.kill_before:
            self.kill_before = None
            os.kill(ray.get(self.fake.ranks[0].pid.remote()), signal.SIGKILL)
        return super().train_step()


def test_killed_fake_score_rank_is_rebuilt_bit_identically(straight, tiny_assets, tmp_path):
    """The fake score's rank dies by SIGKILL in step 3; the job restarts its services (teacher, fake score,
    reward actors), reloads step 2's checkpoint (generator, EMA, fake score, both optimizers, the optimizer-step
    count) and ends bit for bit where the undisturbed run does."""
    cfg = RTDMDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path, config="tiny_rtdmd.yaml"))
    tr = KillingRTDMDTrainer(cfg, preflight(cfg), kill_before=3)
    try:
        tr.run(progress=False)
    finally:
        tr.shutdown()
    assert tr.kill_before is None
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["role"], e["steps_done"]) for e in events] == [("fake-score rank", 2)]
    a, b = checkpoint_at(straight, STEPS), checkpoint_at(tmp_path, STEPS)
    for name, state in [("student", a["lora"]), *a["extra"].items()]:
        other = b["lora"] if name == "student" else b["extra"][name]
        assert all(np.array_equal(state[k], other[k]) for k in state), name
    assert a["trainer_state"]["optimizer_steps"] == b["trainer_state"]["optimizer_steps"]
