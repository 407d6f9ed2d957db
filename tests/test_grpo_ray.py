"""Stage 1 on a real local Ray cluster: reward actors and their faults, a tiny Flow-GRPO run that raises
its reward, export as an OPD teacher, GRPO-Mix (recovering from a killed reward actor), and evaluation outputs."""
import json
import os
import signal
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from actors.grpo_trainer import GRPOTrainer
from actors.reward import RewardPools
from flowopd.config import ConfigError, EvalConfig, GRPOConfig, RewardSpec, load_config
from pipelines.evaluate import evaluate, preflight_eval
from pipelines.grpo import main as grpo_main
from pipelines.opd import main as opd_main
from pipelines.preflight import preflight
from rewards import RewardError
from tests.conftest import ROOT, tiny_config_dict

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "faulty_rewards.py"
    f.write_text(textwrap.dedent(f"""
        import os
        import numpy as np

        class Raises:
            def __call__(self, images, prompts, metadata):
                raise ValueError("scorer exploded")

        class WrongLength:
            def __call__(self, images, prompts, metadata):
                return {{"score": np.zeros(len(images) + 1)}}

        class SomeNaN:
            def __call__(self, images, prompts, metadata):
                out = images.mean(axis=(1, 2, 3)) / 255.0
                out[0] = np.nan
                return {{"score": out}}

        class DiesOnce:
            def __call__(self, images, prompts, metadata):
                marker = "{tmp_path}/died"
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
                return {{"score": np.ones(len(images))}}
    """))
    return f


def _grpo_config(tiny_assets, out, **changes) -> GRPOConfig:
    raw = yaml.safe_load((ROOT / "configs" / "tiny_grpo.yaml").read_text())
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("runs/tiny_assets", str(tiny_assets)))
    del raw["tiny_assets"]  # a launcher key, not part of the job's configuration
    raw["output_dir"] = str(out)
    for k, v in changes.items():
        node = raw
        *head, last = k.split(".")
        for p in head:
            node = node.setdefault(p, {})
        node[last] = v
    return GRPOConfig.model_validate(raw)


def test_reward_faults(reward_file):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    args = (images, ["p"] * 5, [{}] * 5, ["t"] * 5)
    for cls, match in (("Raises", r"reward 'Raises' failed: ValueError: scorer exploded"),
                       ("WrongLength", r"reward 'WrongLength' output 'score' has 6 values for 5 images")):
        pools = RewardPools([RewardSpec(name=f"{reward_file}:{cls}", label=cls, num_cpus=0.25)])
        with pytest.raises(RewardError, match=match):
            RewardPools.collect(pools.submit(*args), 5)
        ray.kill(pools.actors()[0])
    pools = RewardPools([RewardSpec(name=f"{reward_file}:SomeNaN", label="nan", num_cpus=0.25, batch_size=2)])
    out = RewardPools.collect(pools.submit(*args), 5)["nan"]["score"]
    assert np.isnan(out[[0, 2, 4]]).all() and np.isfinite(out[[1, 3]]).all()
    ray.kill(pools.actors()[0])
    # an actor that dies mid-batch is restarted by Ray and the batch retried; the step is not lost
    pools = RewardPools([RewardSpec(name=f"{reward_file}:DiesOnce", label="dies", num_cpus=0.25)])
    out = RewardPools.collect(pools.submit(*args), 5)["dies"]["score"]
    assert (reward_file.parent / "died").exists() and (out == 1).all()
    ray.kill(pools.actors()[0])


def test_grpo_raises_reward_exports_a_teacher_and_evaluates(tiny_assets, tmp_path):
    cfg_path = tmp_path / "grpo.yaml"
    cfg = _grpo_config(tiny_assets, tmp_path / "grpo")
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert grpo_main(["--config", str(cfg_path), "--no-progress"]) == 0
    hist = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 30
    assert all(m["first_ratio_dev"] < 1e-5 for m in hist)  # log-probs recomputed == rollout log-probs
    assert np.mean([m["reward_mean"] for m in hist[-6:]]) > np.mean([m["reward_mean"] for m in hist[:6]])
    adapter = tmp_path / "grpo" / "adapter"
    assert (adapter / "adapter_config.json").exists()

    ev = EvalConfig.model_validate(yaml.safe_load(yaml.safe_dump({
        "output_dir": str(tmp_path / "eval"), "model": {"base": str(tiny_assets / "base"),
                                                        "max_sequence_length": 16, "resolution": 16},
        "models": {"base": {}, "grpo": {"adapter": str(adapter)}},
        "data": {"sources": [{"path": str(tiny_assets / "geneval_train.jsonl"), "format": "geneval"},
                             {"path": str(tiny_assets / "ocr_train.txt"), "format": "ocr"}]},
        "samples_per_prompt": 2, "rewards": [{"name": "brightness", "num_cpus": 0.25},
                                             {"name": "contrast", "num_cpus": 0.25, "tasks": ["ocr"]}],
        "rollout": {"num_cpus": 0.25, "batch_size": 32}})))
    summary = evaluate(ev, preflight_eval(ev))
    table = pq.read_table(tmp_path / "eval" / "results.parquet").to_pydict()
    assert len(table["model"]) == 2 * 12 * 2 and {"prompt", "task", "seed", "brightness/brightness"} <= set(table)
    model, b = np.asarray(table["model"]), np.asarray(table["brightness/brightness"])
    gain = b[model == "grpo"] - b[model == "base"]  # same prompts and seeds: a paired comparison
    assert gain.mean() > 3 * gain.std() / np.sqrt(len(gain)), (gain.mean(), gain.std())
    assert summary["grpo"]["mean"]["brightness/brightness"] > summary["base"]["mean"]["brightness/brightness"]
    assert "contrast/contrast" in summary["base"]["per_task"]["ocr"]
    assert "contrast/contrast" not in summary["base"]["per_task"]["geneval"]
    assert (tmp_path / "eval" / "summary.md").read_text().startswith("| model |")
    assert (tmp_path / "eval" / "grids" / "grpo" / "ocr.png").exists()

    # the exported adapter is a valid OPD teacher
    opd = tiny_config_dict(tiny_assets, tmp_path / "opd", **{"teachers.geneval_teacher": {"adapter": str(adapter)},
                                                             "train.steps": 1, "rollout.workers": 1, "learner.ranks": 1})
    (tmp_path / "opd.yaml").write_text(yaml.safe_dump(opd))
    assert opd_main(["--config", str(tmp_path / "opd.yaml"), "--no-progress"]) == 0


class KillingGRPOTrainer(GRPOTrainer):
    """SIGKILLs the process of reward `kill[1]`'s actor once, before step `kill[0]`."""
    kill = None

    def train_step(self) -> dict:
        if self.kill and self.kill[0] == self.step_done + 1:
            os.kill(ray.get(self.rewards.replicas[self.kill[1]][0].ping.remote()), signal.SIGKILL)
            self.kill = None
        return super().train_step()


@pytest.mark.parametrize("mixing", ["per_prompt", "alternate"])
def test_grpo_mix_logs_each_reward(tiny_assets, tmp_path, mixing):
    rewards = [{"name": "brightness", "label": "bright", "weight": 3.0, "num_cpus": 0.25},
               {"name": "brightness", "label": "dark", "kwargs": {"invert": True}, "weight": 1.0, "num_cpus": 0.25}]
    if mixing == "alternate":  # and the "bright" actor dies before step 3, beyond its restarts, before any checkpoint
        rewards[0]["tasks"], rewards[1]["tasks"], rewards[0]["max_restarts"] = ["geneval"], ["ocr"], 0
    cfg = _grpo_config(tiny_assets, tmp_path, **{"rewards": rewards, "data.mixing": mixing, "train.steps": 4,
                                                 "data.prompts_per_step": 2, "grpo.ema_decay": 0.9,
                                                 "grpo.ema_every": 2, "logger.backend": "tensorboard"})
    tr = KillingGRPOTrainer(cfg, preflight(cfg))
    if mixing == "alternate":
        tr.kill = (3, "bright")
    try:
        hist = tr.run(progress=False)
    finally:
        tr.shutdown()
    if mixing == "alternate":  # the job started over from step 0: the sampler's sequence and the EMA too
        (event,) = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert (event["event"], event["step"], event["steps_done"], event["role"]) == ("recovered", 0, 2, "reward actor")
        assert event["error"].startswith("RewardActorDied: reward 'bright': its actor died")
        assert tr.opt_steps == sum(not m.get("skipped") for m in hist)  # one minibatch: one optimizer step each
    assert [m["step"] for m in hist] == [1, 2, 3, 4]
    if mixing == "per_prompt":  # conflicting rewards, both logged on every step
        for m in hist:
            assert set(m["rewards"]) == {"bright", "dark"}
            assert m["rewards"]["bright"]["brightness"] + m["rewards"]["dark"]["brightness"] == pytest.approx(1)
    else:  # 1:1 epoch ratio: steps alternate between the GenEval and the OCR prompts and their rewards
        assert [list(m["reward_per_task"]) for m in hist] == [["geneval"], ["ocr"], ["geneval"], ["ocr"]]
        assert [set(m["rewards"]) for m in hist] == [{"bright"}, {"dark"}, {"bright"}, {"dark"}]
    assert (tmp_path / "checkpoints" / "step_00000004" / "ema" / "adapter_model.safetensors").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    bright = [e.value for e in events.Scalars("reward_output/bright/brightness")]
    assert bright == pytest.approx([m["rewards"]["bright"]["brightness"] for m in hist if "bright" in m["rewards"]])


def test_grpo_config_errors(tiny_assets, tmp_path):
    path = tmp_path / "g.yaml"
    bad = _grpo_config(tiny_assets, tmp_path / "o").model_dump(mode="json")
    bad["rewards"][0]["tasks"] = ["geneval"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"task 'ocr' of prompt .* has no reward"):
        preflight(load_config(str(path), cls=GRPOConfig))
    (tmp_path / "bad.txt").write_text('a sign "ok"\nno quotes here\n')
    bad["data"]["sources"] = [{"path": str(tmp_path / "bad.txt"), "format": "ocr"}]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"bad\.txt:2"):
        preflight(load_config(str(path), cls=GRPOConfig))


def test_grpo_time_limit_probe_and_lr_schedule_resume_exactly(tiny_assets, tmp_path):
    """A job stopped by its time limit checkpoints the step it is at; a new trainer resumes it to the same
    final weights, EMA and probe curve as an uninterrupted run (cosine learning rate, probe every 2 steps)."""
    import time

    from flowopd.checkpoint import CheckpointManager
    from pipelines.report import probe_curve
    changes = {"train.steps": 4, "train.checkpoint_every": 4, "data.prompts_per_step": 2, "learner.lr_schedule": "cosine",
               "learner.lr_warmup": 1, "probe": {"sources": [{"path": str(tiny_assets / "geneval_train.jsonl"),
                                                               "format": "geneval"}],
                                                  "every": 2, "max_prompts_per_source": 3, "samples_per_prompt": 2}}
    runs = {}
    for name in ("straight", "split"):
        cfg = _grpo_config(tiny_assets, tmp_path / name, **changes)
        tr = GRPOTrainer(cfg, preflight(cfg))
        try:
            tr.run(progress=False, deadline=time.time() + 0.5 if name == "split" else None)
            if name == "split":  # stopped after step 1, which is checkpointed although checkpoint_every is 4
                assert tr.stopped and tr.step_done == 1
                assert CheckpointManager(tmp_path / name / "checkpoints").latest().name == "step_00000001"
                tr.shutdown()
                tr = GRPOTrainer(cfg, preflight(cfg))
                assert tr.resume() == 1
                tr.run(progress=False)
            assert not tr.stopped and tr.step_done == 4
            runs[name] = (tr.lora, tr.ema)
        finally:
            tr.shutdown()
    for a, b in zip(runs["straight"], runs["split"]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    probes = {n: [json.loads(x) for x in (tmp_path / n / "probe.jsonl").read_text().splitlines()] for n in runs}
    assert [p["step"] for p in probes["straight"]] == [0, 2, 4] and probes["split"] == probes["straight"]
    assert len(probes["straight"][0]["reward"]) == 3 * 2 and probes["straight"][2]["samples"] == 4 * 2 * 8
    curve = probe_curve(tmp_path / "straight" / "probe.jsonl")
    assert curve[0]["geneval_gain"]["mean"] == 0.0  # step 0 against itself
    last = np.asarray(probes["straight"][2]["reward"]) - np.asarray(probes["straight"][0]["reward"])
    assert curve[2]["geneval_gain"]["mean"] == pytest.approx(last.mean())
    metrics = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(m.get("probe", {})) for m in metrics] == [[], ["geneval"], [], ["geneval"]]
