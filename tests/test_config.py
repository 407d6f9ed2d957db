"""Configuration and pre-flight errors name the offending key, file or prompt before any actor starts."""
from pathlib import Path

import pytest
import torch
import yaml

from flowopd.config import ConfigError, EvalConfig, GRPOConfig, OPDConfig, load_config
from pipelines.launch import load_job
from pipelines.preflight import check_reward_specs, preflight
from tests.conftest import tiny_config_dict


def _check(tiny_assets, tmp_path, match, **changes):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, tmp_path / "out", **changes)))
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(str(path)))


def _tiny(name: str, cls=OPDConfig):
    """A shipped tiny job file as the launchers read it, without building its tiny assets."""
    return load_job(f"configs/{name}", ["tiny_assets=null"], cls)


def test_shipped_configs_validate():
    for cfg in (_tiny("tiny_opd.yaml"), load_config("configs/sd35m_opd.yaml")):
        assert cfg.route and cfg.mar.teacher
    check_reward_specs(_tiny("tiny_grpo.yaml", GRPOConfig).rewards)
    for name in ("sd35m_grpo_ocr.yaml", "sd35m_grpo_geneval.yaml", "sd35m_grpo_pickscore.yaml", "sd35m_grpo_mix.yaml"):
        cfg = load_config(f"configs/{name}", cls=GRPOConfig)
        check_reward_specs(cfg.rewards)
    assert _tiny("tiny_eval.yaml", EvalConfig).sampling.num_steps == 40
    quality = load_config("configs/sd35m_eval_quality.yaml", cls=EvalConfig)
    check_reward_specs(quality.rewards)
    assert {r.name for r in quality.rewards} >= {"imagereward", "hpsv2", "aesthetic"}


def test_tiny_assets_are_built_by_the_launcher_not_configured(tiny_assets, tmp_path, monkeypatch):
    raw = tiny_config_dict(tiny_assets, tmp_path / "out")
    with pytest.raises(ValueError, match="tiny_assets"):
        OPDConfig.model_validate({**raw, "tiny_assets": "runs/tiny_assets"})
    built = []
    monkeypatch.setattr("world.tiny.ensure_tiny_assets", built.append)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**raw, "tiny_assets": str(tmp_path / "assets")}))
    assert load_job(str(path)).output_dir == str(tmp_path / "out") and built == [str(tmp_path / "assets")]
    assert load_job(str(path), ["tiny_assets=null"]) and built == [str(tmp_path / "assets")]


def test_overrides(tiny_assets, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, tmp_path / "out")))
    cfg = load_config(str(path), ["train.steps=7", "mar.weight=0.04", "learner.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.mar.weight == 0.04 and cfg.learner.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(str(path), ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(str(path), ["train.stepz=3"])


def test_bad_references(tiny_assets, tmp_path):
    _check(tiny_assets, tmp_path, r"route\.ocr: teacher 'nobody' is not defined", **{"route.ocr": "nobody"})
    _check(tiny_assets, tmp_path, r"mar\.teacher", **{"mar.teacher": "ghost"})
    _check(tiny_assets, tmp_path, r"pools? 'gpu' is not defined",
           **{"teachers.anchor": {"adapter": str(tiny_assets / "teachers" / "anchor"), "pool": "gpu"}})


def test_unrouted_task_names_the_prompt(tiny_assets, tmp_path):
    _check(tiny_assets, tmp_path, r"task 'ocr' of prompt 'a sign that says \"open\"' has no entry under `route`",
           route={"geneval": "geneval_teacher"})


def test_bad_adapters_and_data(tiny_assets, tmp_path):
    _check(tiny_assets, tmp_path, r"teachers\.ocr_teacher\.adapter: .*does not exist",
           **{"teachers.ocr_teacher": {"adapter": str(tmp_path / "nope")}})
    (tmp_path / "notpeft").mkdir()
    (tmp_path / "notpeft" / "weights.bin").write_text("x")
    _check(tiny_assets, tmp_path, r"teachers\.ocr_teacher\.adapter: .*not a peft adapter",
           **{"teachers.ocr_teacher": {"adapter": str(tmp_path / "notpeft")}})
    (tmp_path / "empty.txt").write_text("")
    _check(tiny_assets, tmp_path, r"data\.sources\[0\].*holds no prompts",
           **{"data.sources": [{"path": str(tmp_path / "empty.txt"), "format": "txt", "task": "ocr"}]})
    _check(tiny_assets, tmp_path, r"model\.base", **{"model.base": str(tmp_path / "nobase")})


def test_teacher_source_is_exclusive():
    with pytest.raises(ValueError, match="either `adapter` or `transformer`"):
        OPDConfig.model_validate({"output_dir": "x", "model": {"base": "b"},
                                  "teachers": {"t": {"adapter": "a", "transformer": "b"}}, "route": {"k": "t"},
                                  "data": {"sources": [{"path": "p", "format": "txt", "task": "k"}]}})


def test_cli_refuses_to_overwrite_a_run_and_reports_bad_keys(tiny_assets, tmp_path, capsys):
    import numpy as np
    import torch

    from flowopd.checkpoint import CheckpointManager
    from flowopd.models import lora_config
    from pipelines.opd import main
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, tmp_path / "out")))
    p = torch.nn.Parameter(torch.zeros(2))
    saved = CheckpointManager(tmp_path / "out" / "checkpoints").save(
        4, {"a.lora_A.weight": np.ones((2, 2), np.float32)}, lora_config(2, 2),
        torch.optim.AdamW([p]).state_dict(), {})
    assert main(["--config", str(path)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert CheckpointManager.load(saved)["trainer_state"]["step"] == 4
    assert main(["--config", str(path), "--resume", "route.ocr=nobody"]) == 2
    assert "route.ocr: teacher 'nobody'" in capsys.readouterr().err


def test_ray_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cluster = prepare_config(yaml.safe_load(Path("ray_cluster.yaml").read_text()))
    validate_config(cluster)
    advertised = {r for node in cluster["available_node_types"].values() for r in node.get("resources", {})}
    assert {"teacher_node", "rollout_node", "learner_node", "reward_node"} <= advertised
    used = set()
    for path in Path("configs").glob("*.yaml"):
        text = yaml.safe_load(path.read_text())
        stack = [text]
        while stack:  # every `resources:` mapping anywhere in the config
            node = stack.pop()
            if isinstance(node, dict):
                used |= set(node.get("resources") or {}) if isinstance(node.get("resources"), dict) else set()
                stack += list(node.values())
            elif isinstance(node, list):
                stack += node
    assert used and used <= advertised, used - advertised
    assert load_config("configs/sd35m_opd_cluster.yaml").pools["default"].resources == {"teacher_node": 1}


def test_yaml_syntax_and_resolution_errors_are_one_line(tiny_assets, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 0\nmodel: {base: x\noutput_dir: y\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{path}:3:") and "YAML error" in str(e.value)
    assert "\n" not in str(e.value)
    # the tiny model: VAE scale 2 x patch 2; 17 would silently floor to 16
    _check(tiny_assets, tmp_path, r"model\.resolution: 18 is not a multiple of 4", **{"model.resolution": 18})


def test_grpo_defaults_follow_flow_grpo(tiny_assets, tmp_path):
    raw = yaml.safe_load((Path("configs") / "tiny_grpo.yaml").read_text())
    for key in ("grpo", "learner"):
        raw.pop(key)
    raw["data"].pop("prompts_per_step")
    raw["data"]["group_size"] = 24
    del raw["tiny_assets"]
    cfg = GRPOConfig.model_validate(raw)
    assert cfg.learner.lr == 3e-4 and cfg.grpo.detach_uncond and cfg.grpo.ema_decay == 0.9
    assert cfg.samples_per_update() == 576 and cfg.sampling.train_timestep_fraction == 0.99
    assert not _tiny("tiny_opd.yaml").loss.detach_uncond  # the released OPD loss keeps it


def test_overrides_index_lists():
    from flowopd.config import apply_overrides
    raw = {"rewards": [{"name": "a", "replicas": 1}, {"name": "b"}], "train": {"steps": 3}}
    apply_overrides(raw, ["rewards.0.replicas=4", "rewards.1.kwargs.path=/m", "train.steps=5"])
    assert raw["rewards"][0]["replicas"] == 4 and raw["rewards"][1]["kwargs"] == {"path": "/m"}
    assert raw["train"]["steps"] == 5
    with pytest.raises(ConfigError, match=r"rewards is a list of 2; '2' is not an index"):
        apply_overrides(raw, ["rewards.2.replicas=4"])
    with pytest.raises(ConfigError, match=r"'steps' is neither a mapping nor a list"):
        apply_overrides(raw, ["train.steps.x=1"])


def test_check_validates_and_stops_before_ray(tiny_assets, tmp_path, capsys):
    import ray

    from pipelines.opd import main as opd_main
    cfg = tmp_path / "opd.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, tmp_path / "run")))
    ray.shutdown()  # an earlier test's instance; later ones start their own
    assert opd_main(["--config", str(cfg), "--check"]) == 0
    assert "route:" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()
    assert opd_main(["--config", str(cfg), "--check", "data.sources.0.path=/nonexistent.jsonl"]) == 2
    assert "/nonexistent.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("cls", ["TeacherConfig", "EvalModel"])
def test_a_model_has_one_source(cls):
    import flowopd.config as c
    with pytest.raises(ValueError, match="either `adapter` or `transformer`"):
        getattr(c, cls).model_validate({"adapter": "a", "transformer": "t"})


def test_diffusionopd_configs_are_ode_mean_matching_without_mar():
    from actors.opd_trainer import OPDTrainer
    from flowopd.flow import shifted_sigmas
    for cfg in (load_config("configs/sd35m_diffusionopd.yaml"), load_config("configs/world_diffusionopd.yaml")):
        assert cfg.sampling.noise_level == 0 and cfg.mar.teacher is None and not cfg.needs_transitions()
        objective = OPDTrainer.make_objective(cfg)
        dt = shifted_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).diff()
        torch.testing.assert_close(objective.w, dt ** 2 / 2)  # 1/2 ||mu_theta - mu_T||^2 = dt^2/2 ||dv||^2
    world = load_config("configs/world_diffusionopd.yaml")
    assert len(preflight(world)) == 3  # the shipped base, teachers and prompt files


def test_dmd_configs_are_the_released_few_step_setup():
    from actors.resources import requested_resources
    from flowopd.config import DMDConfig
    from pipelines.few_step import configs
    sd35 = load_config("configs/sd35m_dmd.yaml", cls=DMDConfig)
    assert sd35.sampling.timesteps == [1000, 750, 500, 250] and sd35.sampling.noise_level == 0.9
    assert (sd35.dmd.fake_update_ratio, sd35.dmd.consistency_weight, sd35.teacher_guidance("real")) == (10, 0.01, 4.5)
    assert sum(a["GPU"] for a in requested_resources(sd35).values()) == 8  # one node
    assert _tiny("tiny_dmd.yaml", DMDConfig).fake.learner.ranks == 2
    raw = yaml.safe_load(Path("configs/world_few_step.yaml").read_text())
    (world, tilt), evaluation = configs(raw, quick=False)
    assert len(preflight(world)) == 3 and world.output_dir == "runs/few_step/ac_dmd"
    assert (tilt.student.init_adapter, tilt.fake.init_adapter) == ("runs/few_step/ac_dmd/adapter",
                                                                   "runs/few_step/ac_dmd/fake_score")
    assert list(evaluation.models) == ["base_20", "base_4", "ac_dmd_4", "rtdmd_4"]
    assert evaluation.models["ac_dmd_4"].adapter == "runs/few_step/ac_dmd/adapter"


def test_rtdmd_configs_are_the_released_stage_two():
    from actors.resources import requested_resources
    from actors.rtdmd_trainer import RTDMDTrainer
    from flowopd.config import RTDMDConfig
    sd35 = load_config("configs/sd35m_rtdmd.yaml", cls=RTDMDConfig)
    r = sd35.rtdmd
    assert (r.train_range, r.train_steps, r.clip_range, r.dmd_weight) == ((0, 2), 2, 1e-5, 1e-3)
    assert (r.backprop.reward, r.backprop.margin, r.backprop.scale, r.ema_decay, r.ema_every) == ("pickscore", 3.0, 1e-4, 0.9, 8)
    assert (sd35.learner.lr, sd35.learner.weight_decay, sd35.fake.learner.lr, sd35.data.group_size) == (3e-6, 1e-4, 3e-5, 24)
    assert sum(a.get("GPU", 0) for a in requested_resources(sd35).values()) <= 8  # one node
    assert RTDMDTrainer.make_objective(sd35).backprop.base == sd35.model.base
    tiny = _tiny("tiny_rtdmd.yaml", RTDMDConfig)
    assert tiny.rtdmd.backprop.reward == "brightness" and tiny.needs_transitions()


def test_bad_inputs_are_one_line_errors_naming_the_file(tiny_assets, tmp_path):
    """Each of these used to end in a traceback inside an actor, or to be accepted silently."""
    import json
    import shutil
    teacher = tiny_assets / "teachers" / "ocr_teacher"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(teacher, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    errors = [(r"teachers\.ocr_teacher\.adapter: .*corrupt/adapter_model\.safetensors: cannot be read",
               {"teachers.ocr_teacher": {"adapter": str(corrupt)}})]
    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(teacher, wrong_rank)
    cfg = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] // 2}))
    says = rf"teachers\.ocr_teacher\.adapter: .*has rank {cfg['r']}, but .*adapter_config\.json says r={cfg['r'] // 2}"
    errors.append((says, {"teachers.ocr_teacher": {"adapter": str(wrong_rank)}}))
    (tmp_path / "latin1.txt").write_bytes('a sign that says "ok"\na caf\xe9 sign that says "no"\n'.encode("latin-1"))
    errors.append((r"data\.sources\[0\]: .*latin1\.txt:2: not UTF-8",
                   {"data.sources": [{"path": str(tmp_path / "latin1.txt"), "format": "ocr"}]}))
    (tmp_path / "a_file").write_text("")
    errors.append((r"output_dir\b.*a_file is an existing file", {}))
    for match, changes in errors:
        path = tmp_path / "c.yaml"
        raw = tiny_config_dict(tiny_assets, tmp_path / ("a_file" if not changes else "out"), **changes)
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=match) as e:
            preflight(load_config(str(path)))
        if changes:  # (a validation error is the file's name, then one line per bad key)
            assert "\n" not in str(e.value), str(e.value)
    path.write_text("seed: 0\noutput_dir: a\nseed: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}:3:1: YAML error: key 'seed' is given twice"):
        load_config(str(path))
