"""Find a reward class by built-in name, `package.module:Class`, `path/to/file.py:Class` or entry point."""
import importlib
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

from .base import Reward, RewardError

BUILTIN = {
    "world_composition": "world.verifiers:WorldComposition",
    "world_text": "world.verifiers:GlyphText",
    "world_style": "world.verifiers:Vividness",
    "brightness": "rewards.simple:Brightness",
    "color": "rewards.simple:TargetColor",
    "contrast": "rewards.simple:Contrast",
    "ocr": "rewards.ocr:OCR",
    "brisque": "rewards.brisque:Brisque",
    "geneval": "rewards.geneval:GenEval",
    "clip_score": "rewards.clip:CLIPScore",
    "pickscore": "rewards.clip:PickScore",
    "aesthetic": "rewards.clip:Aesthetic",
    "hpsv2": "rewards.clip:HPSv2",
    "imagereward": "rewards.imagereward:ImageReward",
    "reward_server": "rewards.remote:RewardServer",
    "chat_judge": "rewards.remote:ChatJudge",
}
ENTRY_POINT_GROUP = "flowopd.rewards"


def _from_file(path: str, attr: str):
    p = Path(path)
    if not p.exists():
        raise RewardError(f"reward file {p} does not exist")
    spec = importlib.util.spec_from_file_location(f"flowopd_user_reward_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


def load_reward_class(name: str) -> type:
    """Resolve a reward class; errors name what was asked for and what is available."""
    target = BUILTIN.get(name, name)
    try:
        if ":" in target:
            where, attr = target.rsplit(":", 1)
            if where.endswith(".py"):
                cls = _from_file(where, attr)
            else:
                cls = getattr(importlib.import_module(where), attr)
        else:
            (ep,) = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == name] or [None]
            if ep is None:
                raise RewardError(f"unknown reward {name!r}: not built in ({sorted(BUILTIN)}), not "
                                  f"`module:Class` or `file.py:Class`, and no `{ENTRY_POINT_GROUP}` entry point")
            cls = ep.load()
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise RewardError(f"cannot load reward {name!r}: {e}") from None
    if not (isinstance(cls, type) and any("score" in vars(k) or "__call__" in vars(k) for k in cls.__mro__[:-1])):
        raise RewardError(f"reward {name!r} resolved to {cls!r}, which is not a class with score() or __call__()")
    return cls


def make_reward(name: str, kwargs: dict | None = None) -> Reward:
    return load_reward_class(name)(**(kwargs or {}))
