"""BRISQUE no-reference image quality with the LIVE-trained SVM that ships inside the `brisque` package
(works offline): a cheap quality reward and a real scorer for tests. Outputs `quality` = (100 - BRISQUE) /
100 (higher is better, the training reward) and the raw `brisque` score (lower is better)."""
import numpy as np

from .base import Reward


def _flat(values) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])


class Brisque(Reward):
    outputs = ("quality", "brisque")

    def __init__(self):
        try:
            from brisque import BRISQUE
        except ImportError as e:
            raise ImportError("the BRISQUE reward needs `pip install brisque opencv-python-headless`") from e

        class _Numpy2Brisque(BRISQUE):
            def scale_features(self, features):
                """The package's version calls float() on 1-element arrays, which numpy 2 refuses."""
                lo, hi = _flat(self.scale_params["min_"]), _flat(self.scale_params["max_"])
                return -1 + 2.0 / (hi - lo) * (_flat(features) - lo)

        self.model = _Numpy2Brisque(url=False)

    def score(self, images, prompts, metadata):
        raw = np.asarray([float(self.model.score(np.ascontiguousarray(im))) for im in images])
        return {"quality": (100.0 - raw) / 100.0, "brisque": raw}
