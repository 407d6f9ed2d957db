"""Flow-OPD on a real local Ray cluster: routing, fault tolerance, NaN targets, DDP equivalence,
end-to-end distillation, bit-identical resume, and jobs that recover from killed actors by themselves."""
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from peft import PeftModel
from ray.exceptions import ActorDiedError, RayTaskError
from safetensors.torch import load_file, save_file

from actors.learner import LearnerGroup, gather_ranks
from actors.opd_trainer import OPDTrainer, micro_groups
from actors.resources import check_cluster_resources
from flowopd.config import ConfigError, OPDConfig
from flowopd.flow import sde_std, sde_step, shifted_sigmas
from flowopd.learner import PER_STATE, Learner, select_states
from flowopd.models import encode_prompts, load_pipeline, load_transformer, velocity
from pipelines.preflight import preflight
from tests.conftest import checkpoint_at, tiny_config_dict, velocity_gaps
from world.tiny import GENEVAL, OCR

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _trainer(cfg):
    return OPDTrainer(cfg, preflight(cfg))


def _model(assets, adapter=None):
    base = load_transformer(str(assets / "base"))
    return PeftModel.from_pretrained(base, str(adapter)) if adapter else base


def test_routing_labels_each_state_with_its_teacher_and_mar(make_config, tiny_assets):
    cfg = make_config(**{"rollout.workers": 1, "learner.ranks": 1, "pools.default.replicas": 2,
                         "pools.default.batch_size": 16, "teachers.anchor": {"guidance": 1.0}})  # MAR = frozen base
    tr = _trainer(cfg)
    try:
        prompts = [GENEVAL[0][1], OCR[0], GENEVAL[1][1], OCR[1]]
        tasks = ["geneval", "ocr", "geneval", "ocr"]
        ro = ray.get(tr.workers[0].rollout.remote(1, 0, tr.lora, prompts, [0, 1, 2, 3]))
        # streamed micro-groups of any samples (here 3 of prompt 1's 4, then the rest) hold the same states
        groups = [(prompts[1:2], [1], [(0, 0), (0, 1), (0, 2)]), (prompts[1:3], [1, 2], [(0, 3), (1, 0), (1, 1)])]
        parts = [ray.get(r) for r in tr.workers[0].rollout_stream.options(num_returns="streaming").remote(
            1, 0, tr.lora_ref, groups, False)]
        whole = {(ro["prompt_idx"][i], ro["sample_idx"][i] % 4, ro["step_idx"][i]): ro["x"][i] for i in range(len(ro["x"]))}
        for (_, ids, samples), part in zip(groups, parts):
            for i in range(len(part["x"])):
                p, k = samples[part["sample_idx"][i]]
                np.testing.assert_allclose(part["x"][i], whole[(ids[p], k, part["step_idx"][i])], atol=1e-5)
        v_task, v_mar, _teacher_idx, jobs = tr.label(ro, tasks)
        assert jobs == 2 * 2 + 2  # one call per (teacher, replica), plus MAR over both replicas
        assert len(ro["x"]) == 4 * 4 * 9
        sigmas = shifted_sigmas(10, 3.0)
        teachers = {n: _model(tiny_assets, tiny_assets / "teachers" / n) for n in ("geneval_teacher", "ocr_teacher")}
        base = _model(tiny_assets)
        x = torch.tensor(ro["x"])
        pi = torch.tensor(ro["prompt_idx"])
        args = (sigmas[ro["step_idx"]], torch.as_tensor(ro["embeds"])[pi], torch.as_tensor(ro["pooled"])[pi],
                torch.as_tensor(ro["neg_embeds"]), torch.as_tensor(ro["neg_pooled"]), 4.5)
        with torch.no_grad():
            want = {n: velocity(m, x, *args).numpy() for n, m in teachers.items()}
            want_mar = velocity(base, x, *args[:-1], 1.0).numpy()
        routed = np.asarray([{"geneval": "geneval_teacher", "ocr": "ocr_teacher"}[tasks[p]] for p in ro["prompt_idx"]])
        for name in teachers:
            mine, other = routed == name, routed != name
            np.testing.assert_allclose(v_task[mine], want[name][mine], atol=1e-4)
            assert np.abs(v_task[other] - want[name][other]).reshape(other.sum(), -1).max(1).min() > 1e-2
        np.testing.assert_allclose(v_mar, want_mar, atol=1e-4)

        # a teacher replica that dies is restarted and its query retried
        pid = ray.get(tr.pools.replicas["default"][0].ping.remote())
        ray.kill(tr.pools.replicas["default"][0], no_restart=False)
        v_task2, _, _, _ = tr.label(ro, tasks)
        np.testing.assert_allclose(v_task2, v_task, atol=1e-5)
        assert ray.get(tr.pools.replicas["default"][0].ping.remote()) != pid
    finally:
        tr.shutdown()


def test_nan_targets_are_skipped_and_counted(make_config, tiny_assets, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_assets / "teachers" / "ocr_teacher", poisoned)
    weights = load_file(str(poisoned / "adapter_model.safetensors"))
    weights = {k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, str(poisoned / "adapter_model.safetensors"))
    cfg = make_config(**{"teachers.ocr_teacher": {"adapter": str(poisoned)}, "train.steps": 2,
                         "data.prompts_per_step": 6, "rollout.workers": 1})
    tr = _trainer(cfg)
    try:
        hist = tr.run(progress=False)
    finally:
        tr.shutdown()
    for m in hist:  # every OCR state (4 samples x 9 steps per prompt) is dropped, never applied
        assert m["nonfinite_targets"] > 0 and m["nonfinite_targets"] % (4 * 9) == 0
        assert "ocr" not in m.get("loss_per_task", {})
    assert all(np.isfinite(v).all() for v in tr.lora.values())


def _random_batches(cfg, n: int = 22, prompts: int = 3, count: int = 3) -> list[dict]:
    """Learner batches of random states and targets on the tiny model, with x' sampled as a rollout would."""
    rng = np.random.default_rng(0)
    pipe = load_pipeline(cfg.model.base)
    e, pooled = encode_prompts(pipe, ["a red cube", "a blue ball", 'a sign "ok"'][:prompts], 16)
    ne, npool = encode_prompts(pipe, [""], 16)
    sig = shifted_sigmas(10, 3.0)
    std = sde_std(sig, 0.7)
    base = load_transformer(cfg.model.base)
    batches = []
    for _ in range(count):
        x = torch.as_tensor(rng.standard_normal((n, 4, 8, 8), dtype=np.float32))
        j, pi = torch.as_tensor(rng.integers(0, 9, n)), torch.as_tensor(rng.integers(0, prompts, n))
        with torch.no_grad():  # x' sampled from the initial student (= base), as a rollout would
            v = velocity(base, x, sig[j], e[pi], pooled[pi], ne, npool, 4.5)
            x_next, _, logp = sde_step(x, v, sig[j], sig[j + 1], std[j])
        batches.append({"x": x.numpy(), "x_next": x_next.numpy(), "logp_old": logp.numpy(),
                        "step_idx": j.numpy(), "prompt_idx": pi.numpy(),
                        "v_task": rng.standard_normal((n, 4, 8, 8), dtype=np.float32),
                        "v_mar": rng.standard_normal((n, 4, 8, 8), dtype=np.float32),
                        "embeds": e.numpy(), "pooled": pooled.numpy(), "neg_embeds": ne.numpy(),
                        "neg_pooled": npool.numpy()})
    return batches


def _single_process_weights(cfg, batches) -> dict:
    single = Learner(cfg, OPDTrainer.make_objective(cfg), world_size=1)
    for b in batches:
        single.train_step(b, len(b["x"]))
    ref = single.lora_state()
    assert max(np.abs(ref[k]).max() for k in ref if "lora_B" in k) > 1e-3  # the weights moved
    return ref


@pytest.mark.parametrize("form", ["analytic", "policy_gradient"])
def test_ddp_ranks_match_single_process(make_config, form):
    cfg = make_config(**{"learner.micro_batch_size": 5, "learner.lr": 1e-2, "loss.form": form})
    batches = _random_batches(cfg)
    group = LearnerGroup(cfg, OPDTrainer.make_objective(cfg))
    try:
        for b in batches:
            group.train_step(b)
        ranks = group.all_lora_states()
    finally:
        group.shutdown()
    ref = _single_process_weights(cfg, batches)
    for k in ref:
        assert np.array_equal(ranks[0][k], ranks[1][k]), k
        # within 1% of one AdamW step (lr): summation order moves elements whose gradient is near 0 that much
        np.testing.assert_allclose(ranks[0][k], ref[k], atol=1e-2 * cfg.learner.lr, rtol=1e-4)


def test_overlapped_accumulation_matches_the_phased_step(make_config):
    """Micro-groups sent by reference to 2 ranks (each takes its share) in any arrival order, one `apply`:
    the same update as one process's step on the whole batch; a state with a non-finite target is left out,
    as the phased step does."""
    cfg = make_config(**{"learner.micro_batch_size": 5, "learner.lr": 1e-2})
    batches = _random_batches(cfg)
    batches[1]["v_task"][4, 0, 0, 0] = np.nan
    group = LearnerGroup(cfg, OPDTrainer.make_objective(cfg))
    try:
        for b, order in zip(batches, ([0, 1, 2], [2, 0, 1], [1, 2, 0])):
            bounds = [0, 7, 16, 22]
            refs = []
            for g in order:
                sl = slice(bounds[g], bounds[g + 1])
                rollout = {k: (v[sl] if k in PER_STATE else v) for k, v in b.items() if k not in ("v_task", "v_mar")}
                refs += group.accumulate(g, ray.put(rollout), ray.put(b["v_task"][sl]), ray.put(b["v_mar"][sl]))
            results = ray.get(refs)
            assert sum(r["nonfinite"] for r in results) == int(not np.isfinite(b["v_task"]).all())
            group.apply(sum(len(r["step_idx"]) for r in results))
        ranks = group.all_lora_states()
    finally:
        group.shutdown()
    keep = np.ones(22, bool)
    keep[4] = False
    batches[1] = select_states(batches[1], np.nonzero(keep)[0])
    ref = _single_process_weights(cfg, batches)
    for k in ref:  # Adam moves an entry with a near-zero gradient by up to lr whatever its float noise: 1% of lr
        assert np.array_equal(ranks[0][k], ranks[1][k]), k
        np.testing.assert_allclose(ranks[0][k], ref[k], atol=1e-4, rtol=1e-4)


def test_accumulated_gradient_is_the_phased_one_whatever_the_arrival_order(make_config):
    cfg = make_config(**{"learner.micro_batch_size": 5})
    (batch,) = _random_batches(cfg, count=1)
    groups = [select_states(batch, np.arange(lo, hi)) for lo, hi in ((0, 7), (7, 16), (16, 22))]

    def grads(learner):
        return torch.cat([p.grad.flatten() for p in learner.params]).clone()

    phased = Learner(cfg, OPDTrainer.make_objective(cfg))
    phased.train_step(batch, 22)
    runs = []
    for order in ([0, 1, 2], [2, 1, 0]):
        learner = Learner(cfg, OPDTrainer.make_objective(cfg))
        for g in order:
            learner.accumulate(g, groups[g])
        learner.apply(22)
        runs.append((grads(learner), learner.lora_state()))
    want = grads(phased)  # equal up to float summation order: 1e-6 of the largest entry
    assert (runs[0][0] - want).abs().max() <= 1e-6 * want.abs().max()
    assert torch.equal(runs[0][0], runs[1][0])  # group order, not arrival order, fixes the float sums
    for k, v in runs[0][1].items():
        assert np.array_equal(v, runs[1][1][k]), k


def test_micro_groups_hold_samples_of_one_task_and_share_the_prompts_out_by_task():
    tasks = ["a", "b", "a", "a", "b", "a", "a"]
    assert micro_groups(tasks, 2, 3, 2) == [
        [[(0, 0), (0, 1), (2, 0)], [(2, 1), (3, 0), (3, 1)], [(5, 0), (5, 1)]],
        [[(6, 0), (6, 1)], [(1, 0), (1, 1), (4, 0)], [(4, 1)]]]
    assert micro_groups(tasks, 1, 20, 1) == [[[(0, 0), (2, 0), (3, 0), (5, 0), (6, 0)], [(1, 0), (4, 0)]]]
    assert micro_groups(tasks[:1], 2, 1, 2) == [[[(0, 0)], [(0, 1)]], []]


def test_overlapped_and_phased_steps_agree_and_only_the_phased_one_ships_states_through_the_driver(straight_run,
                                                                                                  tmp_path):
    cfg, overlapped = straight_run  # overlapped (the default): micro-groups, each split over the 2 ranks
    phased = cfg.model_copy(update={"output_dir": str(tmp_path), "rollout": cfg.rollout.model_copy(update={"overlap": False}),
                                    "train": cfg.train.model_copy(update={"steps": 8})})
    tr = _trainer(phased)
    try:
        hist = tr.run(progress=False)
    finally:
        tr.shutdown()
    for mo, mp in zip(overlapped, hist):
        assert mo["states"] == mp["states"] == 4 * 4 * 9
        np.testing.assert_allclose([mo["loss"], mo["mar_loss"]], [mp["loss"], mp["mar_loss"]], rtol=1e-5)
        assert mo["loss_per_task"].keys() == mp["loss_per_task"].keys()
        assert mo["driver_bytes"] < 0.01 * mo["state_bytes"]
        assert mp["driver_bytes"] > mp["state_bytes"]  # every state, and every target, came to the driver
    a = checkpoint_at(cfg.output_dir, 8)
    b = checkpoint_at(tmp_path, 8)
    for k in a["lora"]:
        np.testing.assert_allclose(a["lora"][k], b["lora"][k], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def straight_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cfg = OPDConfig.model_validate(tiny_config_dict(tiny_assets, out, **{"train.steps": 16, "train.checkpoint_every": 4}))
    tr = _trainer(cfg)
    try:
        hist = tr.run(progress=False)
    finally:
        tr.shutdown()
    return cfg, hist


def test_end_to_end_student_moves_toward_routed_teachers(straight_run, tiny_assets):
    cfg, hist = straight_run
    assert len(hist) == 16 and all(m["policy_version"] == m["step"] - 1 for m in hist)
    first = np.mean([m["loss"] for m in hist[:4]])
    last = np.mean([m["loss"] for m in hist[-4:]])
    assert last < 0.8 * first, (first, last)
    m = hist[-1]
    assert len(m["loss_per_step"]) == 9 and m["mar_loss"] > 0 and m["grad_norm"] > 0
    assert set(m["time"]) == {"rollout", "label", "learn", "sync", "other", "total"}
    before = velocity_gaps(tiny_assets, None)
    after = velocity_gaps(tiny_assets, f"{cfg.output_dir}/checkpoints/step_00000016/student")
    for task, mine, other in (("geneval", "geneval_teacher", "ocr_teacher"), ("ocr", "ocr_teacher", "geneval_teacher")):
        gain_mine = 1 - after[(task, mine)] / before[(task, mine)]
        gain_other = 1 - after[(task, other)] / before[(task, other)]
        assert gain_mine > 0.3 and gain_mine > gain_other + 0.15, (task, gain_mine, gain_other)
        assert after[(task, mine)] < after[(task, other)]


def test_resume_is_bit_identical(straight_run, tiny_assets, tmp_path):
    """A new driver resumes the straight run as if it had crashed after step 11: its checkpoints 12 and 16 are
    gone, its metrics run on to step 16. The resumed job must drop metrics past its checkpoint and end with the
    straight run's weights and sampler state."""
    cfg, _ = straight_run
    shutil.copytree(cfg.output_dir, tmp_path, dirs_exist_ok=True)
    for step in (12, 16):
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step:08d}")
    tr = _trainer(cfg.model_copy(update={"output_dir": str(tmp_path)}))
    try:
        assert tr.resume() == 8
        assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
            list(range(1, 9))
        tr.run(progress=False)
    finally:
        tr.shutdown()
    a = checkpoint_at(cfg.output_dir, 16)
    b = checkpoint_at(tmp_path, 16)
    for k in a["lora"]:
        assert np.array_equal(a["lora"][k], b["lora"][k]), k
    assert a["trainer_state"]["sampler"] == b["trainer_state"]["sampler"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


class KillingOPDTrainer(OPDTrainer):
    """SIGKILLs an actor's process before chosen steps, each once (a step replayed after recovery runs clean):
    `kills` maps a step to a function of the trainer that returns the remote method giving the victim's pid."""

    def __init__(self, cfg, sources, kills: dict | None = None):
        self.kills = dict(kills or {})
        super().__init__(cfg, sources)

    def train_step(self) -> dict:
        victim = self.kills.pop(self.step_done + 1, None)
        if victim is not None:
            os.kill(ray.get(victim(self).remote()), signal.SIGKILL)
        return super().train_step()


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_killed_actors_are_rebuilt_and_the_run_stays_bit_identical(straight_run, tiny_assets, tmp_path, caplog):
    """A rollout worker, a learner rank and a teacher replica (no Ray restarts left) each die by SIGKILL; the
    job restarts what died and resumes from the newest checkpoint each time, and ends exactly where an
    undisturbed one does."""
    cfg, straight = straight_run
    cfg_k = OPDConfig.model_validate(tiny_config_dict(
        tiny_assets, tmp_path, **{"train.steps": 16, "train.checkpoint_every": 4, "pools.default.max_restarts": 0}))
    tr = KillingOPDTrainer(cfg_k, preflight(cfg_k), {6: lambda t: t.workers[1].pid, 10: lambda t: t.learners.ranks[1].pid,
                                                      13: lambda t: t.pools.replicas["default"][0].ping})
    try:
        hist = tr.run(progress=False)
    finally:
        tr.shutdown()
    assert not tr.kills
    assert [m["step"] for m in hist] == list(range(1, 17))
    assert [m["loss"] for m in hist] == [m["loss"] for m in straight]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))
    a = checkpoint_at(cfg.output_dir, 16)
    b = checkpoint_at(tmp_path, 16)
    for k in a["lora"]:
        assert np.array_equal(a["lora"][k], b["lora"][k]), k
    assert a["trainer_state"]["sampler"] == b["trainer_state"]["sampler"]
    events = _events(tmp_path)
    assert [(e["event"], e["steps_done"], e["step"], e["failures"], e["role"]) for e in events] == [
        ("recovered", 5, 4, 1, "rollout worker"), ("recovered", 9, 8, 2, "learner rank"),
        ("recovered", 12, 12, 3, "teacher replica")]
    # only what died is replaced: the worker alone, the learners' whole collective group, the services
    assert [e["restarted"] for e in events] == ["that rollout worker", "the learner group", "the teacher replica actors"]
    assert all(e["error"].startswith("ActorDiedError: ") for e in events)
    assert len([r for r in caplog.records if r.name == "train" and "resumed from step" in r.message]) == 3


class FaultyOPDTrainer(KillingOPDTrainer):
    """Hands the learners targets of the wrong shape while `corrupt` is set: a bug, raised in every rank."""
    corrupt = False

    def _start(self):
        super()._start()
        accumulate = self.learners.accumulate

        def faulty(group, rollout_ref, v_task_ref, v_mar_ref=None):
            if self.corrupt:
                v_task_ref = ray.put(np.zeros((1, 3), np.float32))
            return accumulate(group, rollout_ref, v_task_ref, v_mar_ref)
        self.learners.accumulate = faulty


def test_bugs_end_the_job_and_so_do_failures_past_max(make_config, tmp_path):
    cfg = make_config(**{"train.steps": 1, "train.max_failures": 0})
    out = Path(cfg.output_dir)
    tr = FaultyOPDTrainer(cfg, preflight(cfg))
    try:
        tr.corrupt = True  # the learners' RuntimeError is no dead DDP peer: raised at once, no event logged
        with pytest.raises(RayTaskError, match="must match the size"):
            tr.run(progress=False)
        assert not (out / "events.jsonl").exists() and tr.step_done == 0
        tr.corrupt = False
        tr.kills = {1: lambda t: t.workers[0].pid}
        with pytest.raises(ActorDiedError):
            tr.run(progress=False)
    finally:
        tr.shutdown()
    (event,) = _events(out)
    assert (event["event"], event["steps_done"], event["failures"], event["role"]) == ("failed", 0, 1, "rollout worker")


def test_a_rank_that_dies_is_reported_before_the_collective_error_of_its_peers():
    """A peer's RuntimeError from the broken collective becomes the rank's ActorDiedError; other errors stay."""
    @ray.remote(num_cpus=0)
    class Rank:
        def pid(self):
            return os.getpid()

        def step(self, seconds):
            threading.Event().wait(seconds)

    @ray.remote(num_cpus=0)
    def peer(error):
        raise error

    dying, alive = Rank.remote(), Rank.remote()
    pid = ray.get(dying.pid.remote())
    broken = peer.remote(RuntimeError("Connection closed by peer"))
    ray.wait([broken])  # the peer fails before the rank's death is known, as it can in a real collective
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(ActorDiedError) as died:
        gather_ranks([broken, dying.step.remote(60)])
    assert isinstance(died.value.__cause__, RayTaskError)
    with pytest.raises(RayTaskError, match="Connection closed"):
        gather_ranks([peer.remote(RuntimeError("Connection closed by peer")), alive.step.remote(0)])
    with pytest.raises(RayTaskError, match="a bug"):
        gather_ranks([peer.remote(ValueError("a bug")), alive.step.remote(60)])
    ray.kill(alive)


def test_over_asking_gpus_is_refused(make_config):
    cfg = make_config(**{"learner.num_gpus": 1})
    with pytest.raises(ConfigError, match=r"asks for 2 GPU \(learner: 2\) but the cluster has 0"):
        check_cluster_resources(cfg)
