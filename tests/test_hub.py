"""Hub ids resolve through the Hugging Face cache (offline here: a cache laid out as the Hub writes it), a
local path always wins, and an id that is neither local nor cached is one error naming key and id."""
import shutil

import pytest

from flowopd.config import ConfigError, OPDConfig
from flowopd.hub import resolve
from pipelines.preflight import preflight
from tests.conftest import tiny_config_dict


def _cache(root, repo_id, src, sub=None):
    """Put `src` into an HF cache at `root` as the snapshot of `repo_id` (optionally under `sub`)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap / sub if sub else snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snap


def test_hub_ids_resolve_from_the_cache_offline(tiny_assets, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    base = _cache(cache, "someone/tiny-sd3", tiny_assets / "base")
    teacher = _cache(cache, "someone/teachers", tiny_assets / "teachers" / "ocr_teacher", sub="ocr")
    raw = tiny_config_dict(tiny_assets, tmp_path / "out", **{"model.base": "someone/tiny-sd3",
                                                              "teachers.ocr_teacher.adapter": "hf://someone/teachers/ocr"})
    cfg = OPDConfig.model_validate(raw)
    preflight(cfg)
    assert cfg.model.base == str(base) and cfg.teachers["ocr_teacher"].adapter == str(teacher / "ocr")
    assert resolve(str(tiny_assets / "base"), "model.base") == str(tiny_assets / "base")
    with pytest.raises(ConfigError, match=r"model\.base: 'nobody/missing' is not a local path, and the Hub repo "
                                          r"'nobody/missing' is not in the Hub cache"):
        resolve("nobody/missing", "model.base")
    with pytest.raises(ConfigError, match=r"has no folder 'nope'"):
        resolve("hf://someone/teachers/nope", "teachers.x.adapter")
