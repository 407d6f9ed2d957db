"""Configuration and pre-flight errors name the offending key, file or prompt before any actor starts."""
from pathlib import Path

import pytest
import yaml

from flowopd.config import ConfigError, EvalConfig, GRPOConfig, OPDConfig, load_config
from flowopd.preflight import check_reward_specs, preflight
from tests.conftest import tiny_config_dict


def _check(tiny_assets, tmp_path, match, **changes):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_assets, tmp_path / "out", **changes)))
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(str(path)))


def test_shipped_configs_validate():
    for name in ("tiny_opd.yaml", "sd35m_opd.yaml"):
        cfg = load_config(f"configs/{name}")
        assert cfg.route and cfg.mar.teacher
    for name in ("tiny_grpo.yaml", "sd35m_grpo_ocr.yaml", "sd35m_grpo_geneval.yaml", "sd35m_grpo_pickscore.yaml",
                 "sd35m_grpo_mix.yaml"):
        cfg = load_config(f"configs/{name}", cls=GRPOConfig)
        check_reward_specs(cfg.rewards)
    assert load_config("configs/tiny_eval.yaml", cls=EvalConfig).sampling.num_steps == 40
    quality = load_config("configs/sd35m_eval_quality.yaml", cls=EvalConfig)
    check_reward_specs(quality.rewards)
    assert {r.name for r in quality.rewards} >= {"imagereward", "hpsv2", "aesthetic"}


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
