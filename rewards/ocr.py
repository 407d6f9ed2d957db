"""OCR reward with Flow-GRPO's scoring rule on top of an OCR engine (default: rapidocr, whose PP-OCR
ONNX weights ship inside the package, so it runs offline)."""
import numpy as np

from .base import Reward


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's rule: compare without spaces, lower-cased; 1 if the target appears in the recognised
    text, else 1 - min(Levenshtein, len(target)) / len(target)."""
    rec, tgt = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        return float("nan")
    if tgt in rec:
        return 1.0
    return 1.0 - min(edit_distance(rec, tgt), len(tgt)) / len(tgt)


def prompt_target(prompt: str, metadata: dict) -> str:
    """The text to render: metadata['text'] (set by the OCR prompt reader), else the first quoted span
    (flowopd.data.ocr_target's rule, repeated so that rewards/ needs nothing from flowopd/)."""
    if metadata.get("text"):
        return metadata["text"]
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else ""


class OCR(Reward):
    """Outputs `ocr` (the partial-credit reward) and `ocr_exact` (1 when the target is read exactly)."""

    outputs = ("ocr", "ocr_exact")

    def __init__(self, engine_params: dict | None = None):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError("the OCR reward needs `pip install rapidocr onnxruntime` (or the [ocr] extra)") from e
        self.engine = RapidOCR(params=engine_params) if engine_params else RapidOCR()

    def read(self, image: np.ndarray) -> str:
        result = self.engine(np.ascontiguousarray(image))
        return "".join(result.txts or ())

    def score(self, images, prompts, metadata):
        scores = np.asarray([ocr_score(self.read(im), prompt_target(p, m))
                             for im, p, m in zip(images, prompts, metadata)])
        return {"ocr": scores, "ocr_exact": (scores == 1.0).astype(np.float64)}
