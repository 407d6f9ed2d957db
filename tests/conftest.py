import copy
from pathlib import Path

import pytest
import ray
import torch
import yaml
from peft import PeftModel

from flowopd.checkpoint import CheckpointManager, step_dir_name
from flowopd.config import OPDConfig
from flowopd.models import encode_prompts, load_pipeline, load_transformer, velocity
from world.tiny import GENEVAL, OCR, ensure_tiny_assets

ROOT = Path(__file__).resolve().parents[1]


def velocity_gaps(assets, student_dir):
    """Mean squared velocity gap between the student and each task teacher, on each task's prompts."""
    pipe = load_pipeline(str(assets / "base"))
    neg = encode_prompts(pipe, [""], 16)
    student = _peft_model(assets, student_dir) if student_dir else _peft_model(assets)
    teachers = {n: _peft_model(assets, assets / "teachers" / n) for n in ("geneval_teacher", "ocr_teacher")}
    gaps = {}
    for task, prompts in (("geneval", [p for _, p in GENEVAL]), ("ocr", OCR)):
        e, p = encode_prompts(pipe, prompts, 16)
        x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for s in (0.9, 0.5, 0.2):
                vs = velocity(student, x, s, e, p, *neg, 4.5)
                for name, t in teachers.items():
                    gap = ((vs - velocity(t, x, s, e, p, *neg, 4.5)) ** 2).mean().item()
                    gaps[(task, name)] = gaps.get((task, name), 0.0) + gap
    return gaps


def _peft_model(assets, adapter=None):
    base = load_transformer(str(assets / "base"))
    return PeftModel.from_pretrained(base, str(adapter)) if adapter else base


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return ensure_tiny_assets(str(tmp_path_factory.mktemp("tiny_assets")))


def tiny_config_dict(assets: Path, output_dir: Path, config: str = "tiny_opd.yaml", **changes) -> dict:
    """configs/<config> (a tiny_* job) pointed at `assets`, with dotted-key changes applied."""
    raw = yaml.safe_load((ROOT / "configs" / config).read_text())
    text = yaml.safe_dump(raw).replace("runs/tiny_assets", str(assets))
    raw = yaml.safe_load(text)
    del raw["tiny_assets"]  # a launcher key, not part of the job's configuration
    raw["output_dir"] = str(output_dir)
    for key, value in changes.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return raw


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module: its tests share it (use with pytest.mark.usefixtures)."""
    from pipelines.launch import init_ray
    init_ray(None)
    yield
    ray.shutdown()


def run_job_command(main, assets: Path, out: Path, config: str) -> Path:
    """Runs a job's command line (`main`) on configs/<config> pointed at `assets`; returns its output directory."""
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(assets, out / "run", config=config)))
    assert main(["--config", str(path), "--no-progress"]) == 0
    return out / "run"


def checkpoint_at(output_dir, step: int) -> dict:
    """The checkpoint a job wrote at `step` (it must exist)."""
    return CheckpointManager.load(Path(output_dir) / "checkpoints" / step_dir_name(step))


@pytest.fixture
def make_config(tiny_assets, tmp_path):
    def make(**changes) -> OPDConfig:
        return OPDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path / "out", **changes))
    return make


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP model + processor (and a random aesthetic MLP head) saved like a real one."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                  "num_hidden_layers": 2, "vocab_size": len(vocab), "bos_token_id": 0,
                                  "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(path)
    head = {f"layers.{i}.{p}": torch.randn(*shape) * 0.1 for i, shape_w in
            ((0, (1024, 16)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16)))
            for p, shape in (("weight", shape_w), ("bias", (shape_w[0],)))}
    save_file(head, str(path / "head.safetensors"))
    return path
