import copy
from pathlib import Path

import pytest
import yaml

from flowopd.config import OPDConfig
from flowopd.tiny import ensure_tiny_assets

ROOT = Path(__file__).resolve().parents[1]


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
