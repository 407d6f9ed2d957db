"""GenEval's rules (single_object, two_object, counting, colors, position, color_attr) on detections, with
a pluggable detector: a transformers object-detection model from a local directory. (Users with GenEval's
mmdet server use the `reward_server` reward instead.) Colours are classified by CLIP over each object's
crop, as GenEval does, when `clip_path` is given.

Outputs: `geneval` (partial credit: the fraction of the prompt's requirements met) and `geneval_strict`
(1 only if all are met, GenEval's own accuracy)."""
import numpy as np
import torch
from PIL import Image

from .base import Reward
from .clip import _device

THRESHOLD, COUNTING_THRESHOLD, POSITION_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 0.1, 16
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's relations of box a to box b (x0, y0, x1, y1; y grows downwards), with a 10% dead zone."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(objects: dict[str, list], metadata: dict, colors_of=None) -> tuple[float, float, list[str]]:
    """(partial credit, strict, reasons). objects: class -> [(box, score), ...] above the detection
    threshold, best first; colors_of(class, found) -> a colour name per object (needed for colour tasks)."""
    reqs = metadata.get("include", [])
    excl = metadata.get("exclude", [])
    met, reasons, groups = 0, [], []
    for req in reqs:
        cls, count = req["class"], req.get("count", 1)
        found = objects.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if ok and "color" in req:
            if colors_of is None:
                raise ValueError("a colour requirement needs a colour classifier (clip_path)")
            got = colors_of(cls, found)
            ok = got.count(req["color"]) >= count
            if not ok:
                reasons.append(f"expected {req['color']} {cls}>={count}, found {got}")
        if ok and "position" in req:
            rel, target = req["position"]
            if target >= len(groups) or groups[target] is None:
                ok = False
                reasons.append(f"no target group {target} for {cls} {rel}")
            elif not all(rel in relative_position(a[0], b[0]) for a in found for b in groups[target]):
                ok = False
                reasons.append(f"expected {cls} {rel} target {target}")
        groups.append(found if ok else None)
        met += ok
    for req in excl:
        ok = len(objects.get(req["class"], [])) < req["count"]
        if not ok:
            reasons.append(f"expected {req['class']}<{req['count']}")
        met += ok
    total = len(reqs) + len(excl)
    return (met / total if total else 1.0), float(met == total), reasons


class GenEval(Reward):
    outputs = ("geneval", "geneval_strict")

    def __init__(self, detector_path: str, clip_path: str | None = None, device: str = "auto"):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection
        self.device = _device(device)
        self.processor = AutoImageProcessor.from_pretrained(detector_path, local_files_only=True)
        self.detector = AutoModelForObjectDetection.from_pretrained(detector_path, local_files_only=True)
        self.detector.to(self.device).eval()
        self.labels = self.detector.config.id2label
        self.clip = None
        if clip_path:
            from .clip import CLIPScore
            self.clip = CLIPScore(clip_path, device=str(self.device))

    @torch.no_grad()
    def detect(self, image: np.ndarray, threshold: float) -> dict[str, list]:
        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt").to(self.device)
        out = self.detector(**inputs)
        res = self.processor.post_process_object_detection(out, threshold=threshold,
                                                           target_sizes=[image.shape[:2]])[0]
        objects: dict[str, list] = {}
        for score, label, box in sorted(zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()),
                                        reverse=True):
            objects.setdefault(self.labels[label], []).append((box, score))
        return {k: v[:MAX_OBJECTS] for k, v in objects.items()}

    def colors_of(self, image: np.ndarray):
        def classify(cls: str, found: list) -> list[str]:
            crops = []
            for box, _ in found:
                x0, y0, x1, y1 = (round(v) for v in box)
                crop = image[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
                crops.append(np.asarray(Image.fromarray(crop).resize((224, 224))))
            texts = [f"a photo of a {c} {cls}" for c in COLORS]
            img, _ = self.clip.embed(np.stack(crops))
            _, txt = self.clip.embed(np.stack(crops[:1] * len(texts)), texts)
            return [COLORS[i] for i in (img @ txt.T).argmax(-1).tolist()]
        return classify if self.clip is not None else None

    def score(self, images, prompts, metadata):
        partial, strict = [], []
        for image, meta in zip(images, metadata):
            threshold = COUNTING_THRESHOLD if meta.get("tag") == "counting" else THRESHOLD
            p, s, _ = evaluate(self.detect(image, threshold), meta, self.colors_of(image))
            partial.append(p)
            strict.append(s)
        return {"geneval": np.asarray(partial), "geneval_strict": np.asarray(strict)}
