"""Exact verifiers for the one-machine world of world/grammar.py: a programmatic shape-and-colour detector
(scored with GenEval's rules), a glyph reader for the bitmap font (scored with the OCR rule), and the
style score (mean saturation). Registered in rewards/registry.py by name, so rewards/ never imports world/."""
import numpy as np
import torch

from rewards.base import Reward
from rewards.geneval import evaluate
from rewards.ocr import ocr_score

from .grammar import FONT, PALETTE, glyph

INK_DISTANCE = 60  # a pixel within this RGB distance of a palette colour belongs to a shape


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.asarray(pixels))
    return out


SHAPE_RULES = ("template", "fill")


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill an h x w box, as the grammar draws it in a square one."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    return {"square": np.ones((h, w), dtype=bool),
            "circle": ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1,
            "triangle": np.abs(xx - w / 2) <= yy / h * w / 2}


def classify_shape(mask: np.ndarray, rule: str = "template") -> str:
    """The shape of one object's pixel mask (cropped to its bounding box).

    "template": the shape whose drawing in that box overlaps the mask best (intersection over union), so
    a blurred square with rounded corners stays a square and a squat triangle a triangle. "fill": the first
    world's rule on the fill ratio alone (> 0.9 square, > 0.68 circle, else triangle)."""
    if rule == "fill":
        fill = mask.mean()
        return "square" if fill > 0.9 else ("circle" if fill > 0.68 else "triangle")
    iou = {k: (mask & t).sum() / (mask | t).sum() for k, t in _templates(*mask.shape).items()}
    return max(iou, key=iou.get)


def detect_shapes(image: np.ndarray, min_area: int = 12, rule: str = "template") -> dict[str, list]:
    """{shape: [(box, confidence 1.0, colour), ...]} left to right."""
    img = image.astype(np.float64)
    names = list(PALETTE)
    dist = np.stack([np.linalg.norm(img - np.asarray(PALETTE[c]), axis=-1) for c in names])
    nearest, ink = dist.argmin(0), dist.min(0) < INK_DISTANCE
    objects: dict[str, list] = {}
    for ci, color in enumerate(names):
        for comp in _components(ink & (nearest == ci)):
            if len(comp) < min_area:
                continue
            (y0, x0), (y1, x1) = comp.min(0), comp.max(0) + 1
            mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            mask[comp[:, 0] - y0, comp[:, 1] - x0] = True
            objects.setdefault(classify_shape(mask, rule), []).append(
                ([float(x0), float(y0), float(x1), float(y1)], 1.0, color))
    return {k: sorted(v, key=lambda o: o[0][0]) for k, v in objects.items()}


def detected_colors(cls: str, found: list) -> list[str]:
    return [o[2] for o in found]


class WorldComposition(Reward):
    """GenEval's rules on the programmatic detector: partial credit and strict accuracy. `shape_rule` picks
    the detector's shape classifier (`classify_shape`); the first world's models were scored with "fill"."""

    outputs = ("composition", "composition_strict")

    def __init__(self, shape_rule: str = "fill"):
        if shape_rule not in SHAPE_RULES:
            raise ValueError(f"world_composition: shape_rule must be one of {SHAPE_RULES}, got {shape_rule!r}")
        self.shape_rule = shape_rule

    def score(self, images, prompts, metadata):
        partial, strict = [], []
        for image, meta in zip(images, metadata):
            p, s, _ = evaluate(detect_shapes(image, rule=self.shape_rule), meta, detected_colors)
            partial.append(p)
            strict.append(s)
        return {"composition": np.asarray(partial), "composition_strict": np.asarray(strict)}


def read_glyphs(image: np.ndarray, max_mismatch: float = 0.2) -> str:
    """Read the bitmap-font text: split dark ink into column runs, match each against every glyph."""
    ink = (image.astype(np.int32).max(-1) < 100)
    cols = ink.any(0)
    text, x = [], 0
    templates = {ch: glyph(ch) for ch in FONT}
    while x < len(cols):
        if not cols[x]:
            x += 1
            continue
        end = x
        while end < len(cols) and cols[end]:
            end += 1
        rows = np.nonzero(ink[:, x:end].any(1))[0]
        crop = ink[rows[0]:rows[-1] + 1, x:end]
        best, err = "?", 1.0
        for ch, t in templates.items():
            if crop.shape == t.shape:
                e = float((crop != t).mean())
                if e < err:
                    best, err = ch, e
        text.append(best if err <= max_mismatch else "?")
        x = end
    return "".join(text)


class GlyphText(Reward):
    """The OCR rule on the glyph reader's output."""

    outputs = ("text", "text_exact")

    def score(self, images, prompts, metadata):
        s = np.asarray([ocr_score(read_glyphs(im), m["text"]) for im, m in zip(images, metadata)])
        return {"text": s, "text_exact": (s == 1.0).astype(np.float64)}


class Vividness(Reward):
    """Mean HSV saturation: the preference-like style score (hackable by saturating everything)."""

    outputs = ("style",)

    def score(self, images, prompts, metadata):
        img = images.astype(np.float64)
        mx, mn = img.max(-1), img.min(-1)
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
        return {"style": sat.mean(axis=(1, 2))}

    def differentiable(self, images, prompts, metadata):
        """The same saturation of float images (N, 3, H, W) in [0, 1], as a torch tensor."""
        mx, mn = images.amax(1), images.amin(1)
        sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-9), torch.zeros_like(mx))
        return sat.flatten(1).mean(1)


