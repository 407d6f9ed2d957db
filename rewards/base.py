"""The reward interface and the checks applied to every reward's output."""
from abc import ABC, abstractmethod

import numpy as np


class RewardError(RuntimeError):
    """A reward misbehaved (wrong output shape, exception); the message names the reward."""


class Reward(ABC):
    """Subclass and implement `score`. `outputs` names the arrays returned; outputs[0] is the training reward.

    Rewards that are not thread-safe (OCR engines, OpenCV) need nothing special: each actor serves one
    call at a time, and throughput comes from replicas.
    """

    outputs: tuple[str, ...] = ("score",)

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, np.ndarray]:
        """Per-image float arrays, one per name in `outputs`."""

    def __call__(self, images, prompts, metadata) -> dict[str, np.ndarray]:
        return self.score(images, prompts, metadata)

    @classmethod
    def check_kwargs(cls, **kwargs) -> None:
        """Raise ValueError for settings that bind but cannot work; called before any actor starts."""

    def differentiable(self, images, prompts: list[str], metadata: list[dict]):
        """The training reward (outputs[0]) of float images, a torch tensor (N, 3, H, W) in [0, 1], as a
        tensor (N,) differentiable in them: what reward back-propagation needs. Optional."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable form (implement "
                                  "`differentiable` to use it for reward back-propagation)")


def check_outputs(name: str, out, n: int) -> dict[str, np.ndarray]:
    """Validate a reward's result: a dict of length-n float arrays (NaN allowed: excluded downstream)."""
    if not isinstance(out, dict) or not out:
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a non-empty dict of arrays")
    checked = {}
    for key, values in out.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape[0] != n:
            raise RewardError(f"reward {name!r} output {key!r} has {arr.shape[0]} values for {n} images")
        checked[key] = arr
    return checked
