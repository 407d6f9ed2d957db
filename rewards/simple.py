"""Programmatic rewards that need no weights: for tests, tiny configs and sanity checks of a pipeline."""
import numpy as np

from .base import Reward


class Brightness(Reward):
    """Mean pixel brightness in [0, 1] (or its complement with invert=True, a reward that conflicts)."""

    outputs = ("brightness",)

    def __init__(self, invert: bool = False):
        self.invert = invert

    def score(self, images, prompts, metadata):
        b = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
        return {"brightness": 1.0 - b if self.invert else b}

    def differentiable(self, images, prompts, metadata):
        b = images.flatten(1).mean(1)
        return 1.0 - b if self.invert else b


class TargetColor(Reward):
    """1 - normalised distance between the image's mean colour and a target RGB colour.

    The target comes from the prompt's metadata (`metadata[key]`) when present, else from `rgb`.
    """

    outputs = ("color",)

    def __init__(self, rgb=(255, 0, 0), key: str = "rgb"):
        self.rgb, self.key = np.asarray(rgb, dtype=np.float64), key

    def score(self, images, prompts, metadata):
        mean = images.astype(np.float64).mean(axis=(1, 2))
        target = np.stack([np.asarray(m.get(self.key, self.rgb), dtype=np.float64) for m in metadata])
        dist = np.linalg.norm(mean - target, axis=1) / np.linalg.norm([255.0] * 3)
        return {"color": 1.0 - dist}


class Contrast(Reward):
    """Pixel standard deviation in [0, 1], a cheap stand-in for 'detail'."""

    outputs = ("contrast",)

    def score(self, images, prompts, metadata):
        return {"contrast": images.astype(np.float64).std(axis=(1, 2, 3)) / 127.5}
