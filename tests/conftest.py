import copy
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from flowopd.config import OPDConfig
from flowopd.models import encode_prompts, load_pipeline, load_transformer, velocity
from flowopd.tiny import GENEVAL, OCR, ensure_tiny_assets

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


def tiny_config_dict(assets: Path, output_dir: Path, **changes) -> dict:
    """configs/tiny_opd.yaml pointed at `assets`, with dotted-key changes applied."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny_opd.yaml").read_text())
    text = yaml.safe_dump(raw).replace("runs/tiny_assets", str(assets))
    raw = yaml.safe_load(text)
    raw["tiny_assets"] = None
    raw["output_dir"] = str(output_dir)
    for key, value in changes.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return raw


@pytest.fixture
def make_config(tiny_assets, tmp_path):
    def make(**changes) -> OPDConfig:
        return OPDConfig.model_validate(tiny_config_dict(tiny_assets, tmp_path / "out", **changes))
    return make
