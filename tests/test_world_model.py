"""The shipped world base model (assets/world) and the command that reproduces it."""
import json

import numpy as np
import pytest
import torch

from flowopd.models import load_pipeline, quiet_libraries
from pipelines import train_world, world_signal
from rewards import make_reward
from tests.conftest import ROOT
from world.base_model import world_records
from world.grammar import render, render_imperfect

ASSETS = ROOT / "assets" / "world"
REWARDS = {"composition": make_reward("world_composition"), "text": make_reward("world_text"),
           "style": make_reward("world_style")}


def _records(task: str, split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (ASSETS / f"world_{task}_{split}.jsonl").read_text().splitlines()]


def _score(task, images, records):
    return REWARDS[task](images, [r["prompt"] for r in records], [r["metadata"] for r in records])


def test_shipped_prompt_files_are_the_grammar_split():
    for task, (train, test) in world_records().items():
        assert _records(task, "train") == train and _records(task, "test") == test
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_shipped_vae_keeps_ground_truth_scoring_high():
    """Held-out ground truth, encoded and decoded by the shipped VAE, keeps most of its reward: the VAE
    caps what any model of this world can score (composition 0.81, text 0.85 at the time of writing),
    and that cap must stay far above what the models reach (about 0.3)."""
    quiet_libraries()
    vae = load_pipeline(str(ASSETS / "base")).vae
    for task in ("composition", "text"):
        recs = _records(task)
        gt = np.stack([render(r, np.random.default_rng(i)) for i, r in enumerate(recs)])
        with torch.no_grad():
            x = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recon = ((y / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        reward = _score(task, recon, recs)[task]
        assert reward.mean() >= 0.75, (task, reward.mean())


def test_imperfect_renderings_score_lower():
    rng = np.random.default_rng(0)
    for task, key in (("composition", "composition"), ("text", "text")):
        recs = _records(task, "train")[:40]
        exact = _score(task, np.stack([render(r, rng) for r in recs]), recs)[key]
        wrong = _score(task, np.stack([render_imperfect(r, rng) for r in recs]), recs)[key]
        assert exact.mean() == 1.0 and wrong.mean() < 0.8, (task, wrong.mean())


def test_train_world_writes_a_loadable_model_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "world"
    args = ["--output", str(out), "--per-task", "3", "--vae-steps", "2", "--steps", "2", "--batch-size", "8"]
    assert train_world.main(args) == 0
    report = json.loads((out / "train_world.json").read_text())
    assert report["renderings"] == 9 and report["training_prompts"] > 300 and report["layout"] == "grid"
    pipe = load_pipeline(str(out / "base"))
    assert pipe.transformer.config.sample_size == 16 and pipe.vae.config.scaling_factor != 1.5305
    assert report["transformer_parameters"] == sum(p.numel() for p in pipe.transformer.parameters())
    bigger = tmp_path / "bigger"
    assert train_world.main([*args[2:], "--output", str(bigger), "--layers", "4", "--heads", "4",
                             "--text-encoders", "frozen"]) == 0
    config = load_pipeline(str(bigger / "base")).transformer.config
    assert (config.num_layers, config.num_attention_heads) == (4, 4)
    # the text encoders learn with the transformer by default; frozen, they stay the random ones
    from flowopd.models import build_random_pipeline
    for run, size, moved in ((out, {}, True), (bigger, {"num_layers": 4, "num_attention_heads": 4,
                                                         "caption_projection_dim": 128}, False)):
        random_clip = build_random_pipeline("world", 0, **size).text_encoder.state_dict()
        clip = load_pipeline(str(run / "base")).text_encoder.state_dict()
        assert any(not torch.equal(clip[k], random_clip[k]) for k in clip) == moved, run
    stamp = (out / "base" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_world.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "base" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_train_world_stops_at_its_time_limit_and_resumes_exactly(tmp_path, capsys):
    args = ["--per-task", "2", "--vae-steps", "2", "--steps", "5", "--batch-size", "4", "--checkpoint-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_world.main([*args, "--output", str(straight)]) == 0
    assert not (straight / ".train_world").exists()  # a finished run leaves no checkpoint behind
    assert train_world.main([*args, "--output", str(split), "--time-limit", "0"]) == 3
    assert "--resume" in capsys.readouterr().err and not (split / "base").exists()
    assert torch.load(split / ".train_world" / "transformer.pt", weights_only=False)["step"] == 1
    assert train_world.main([*args, "--output", str(split)]) == 2  # neither restarted over it by accident...
    assert "--resume" in capsys.readouterr().err
    assert train_world.main([*args, "--output", str(split), "--resume", "--lr", "0.01"]) == 2  # ...nor changed
    assert "--lr is 0.01" in capsys.readouterr().err
    assert train_world.main([*args, "--output", str(split), "--resume", "--layout", "row"]) == 2
    assert "--layout is 'row'" in capsys.readouterr().err
    assert train_world.main([*args, "--output", str(split), "--resume"]) == 0
    for f in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors", "text_encoder_3/model.safetensors"):
        assert (straight / "base" / f).read_bytes() == (split / "base" / f).read_bytes(), f
    assert not (split / ".train_world").exists()


def test_group_signal_has_no_spread_without_noise_and_some_with_it():
    """With every step deterministic and a shared initial noise, a group's samples are one image: no spread in
    any window. Each sample's own initial noise gives spread (the row a default GRPO step sees)."""
    from world import signal
    quiet_libraries()
    pipe = load_pipeline(str(ASSETS / "base"))
    recs = _records("style", "train")[:2]
    rows = signal.group_signal(pipe, REWARDS["style"], recs, group_size=3, seed=0,
                               windows={"steps 0-4": [0, 1, 2, 3, 4]}, noise_level=0.0, num_steps=5)
    assert rows["steps 0-4"] == {**rows["steps 0-4"], "mean_group_std": 0.0, "zero_std": 1.0}
    assert rows["all steps, own noise"]["zero_std"] == 0.0
    rows = signal.group_signal(pipe, REWARDS["style"], recs, group_size=3, seed=0,
                               windows={"steps 0-4": [0, 1, 2, 3, 4]}, noise_level=0.7, num_steps=5)
    assert rows["steps 0-4"]["zero_std"] == 0.0


def test_world_signal_reports_every_task(tmp_path, capsys):
    out = tmp_path / "signal.json"
    args = ["--world", str(ASSETS), "--prompts", "2", "--seeds", "1", "--groups", "1", "--group-size", "2",
            "--out", str(out)]
    assert world_signal.main(args) == 0
    report = json.loads(out.read_text())
    assert report["layout"] == "row"  # the shipped world predates the grid layout
    assert list(report["tasks"]) == ["composition", "text", "style"]
    for row in report["tasks"].values():
        assert row["fit_train"]["n"] == 2 and 0 <= row["fit_test"]["mean"] <= 1
        assert set(row["groups"]) == {*world_signal.WINDOWS, "all steps, own noise"}
    assert report["tasks"]["text"]["vae_ceiling"] > 0.75
    assert sum(report["tasks"]["text"]["text_errors"].values()) == pytest.approx(1)
    assert "| composition |" in capsys.readouterr().out
    assert world_signal.main(["--world", str(tmp_path)]) == 2
    assert "base/model_index.json is missing" in capsys.readouterr().err


def test_second_world_ships_its_prompt_files_and_a_valid_stage1_recipe():
    """assets/world2 holds the grammar's split, the unseen-recombination set and the signal report its base was
    judged by; configs/world2_stage1.yaml validates against it (every stage, every prompt file)."""
    from pipelines.recipe import load_recipe
    from world.grammar import unseen_recombinations
    world2 = ROOT / "assets" / "world2"
    records = world_records()
    for task, (train, test) in records.items():
        for split, recs in (("train", train), ("test", test)):
            lines = (world2 / f"world_{task}_{split}.jsonl").read_text().splitlines()
            assert [json.loads(line) for line in lines] == recs
    unseen = [json.loads(line) for line in (world2 / "world_unseen.jsonl").read_text().splitlines()]
    assert unseen == unseen_recombinations([r for train, _ in records.values() for r in train])
    settings = json.loads((world2 / "train_world.json").read_text())
    assert (settings["layout"], settings["text_encoders"]) == ("grid", "train")
    assert json.loads((world2 / "signal.json").read_text())["layout"] == "grid"
    recipe = load_recipe(str(ROOT / "configs" / "world2_stage1.yaml"), [])
    assert {"teachers/text_teacher", "teachers/composition_teacher", "teachers/style_teacher", "grpo_mix",
            "evaluate"} <= set(recipe.stages)
    assert all(recipe.stages[f"teachers/{t}"].probe is not None for t in ("text_teacher", "composition_teacher"))
