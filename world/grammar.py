"""A text-to-image world small enough for one CPU: prompts from a grammar for three tasks,
and exact renderings of what each prompt asks for, so rewards can be exact programs.

* composition: coloured shapes with counts and left/right relations (GenEval-style metadata);
* text: short strings drawn with a 3x5 bitmap font (OCR-style metadata: the target text);
* style: a "vivid" request scored by saturation, a preference-like reward that is easy to hack and pulls
  against the other two (a saturated background hides shapes and glyphs).
Images are 32x32 RGB on a white background.
"""
import itertools
import json
from pathlib import Path

import numpy as np

SIZE = 32
PALETTE = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")
WORDS = {1: "a", 2: "two", 3: "three"}
# 3x5 glyphs, rows top to bottom, "#" = ink
FONT = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    "a": [".#.", "#.#", "###", "#.#", "#.#"], "c": ["###", "#..", "#..", "#..", "###"],
    "e": ["###", "#..", "##.", "#..", "###"], "h": ["#.#", "#.#", "###", "#.#", "#.#"],
    "l": ["#..", "#..", "#..", "#..", "###"], "p": ["###", "#.#", "###", "#..", "#.."],
    "t": ["###", ".#.", ".#.", ".#.", ".#."], "u": ["#.#", "#.#", "#.#", "#.#", "###"],
}
GLYPH_SCALE = 2  # each font pixel is 2x2 image pixels: glyphs are 6x10 with a 2-pixel gap


def glyph(ch: str) -> np.ndarray:
    rows = np.array([[c == "#" for c in r] for r in FONT[ch]])
    return np.kron(rows, np.ones((GLYPH_SCALE, GLYPH_SCALE), dtype=bool))


def shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 2) ** 2
    return np.abs(xx - size / 2) <= yy / 2  # an upward triangle


def composition_prompts() -> list[dict]:
    """Every composition record: counting/colour objects, and two-object left/right relations."""
    out = []
    for color, shape, n in itertools.product(PALETTE, SHAPES, (1, 2, 3)):
        noun = shape + ("s" if n > 1 else "")
        out.append({"task": "composition", "prompt": f"{WORDS[n]} {color} {noun}",
                    "metadata": {"tag": "counting" if n > 1 else "colors",
                                 "include": [{"class": shape, "count": n, "color": color}],
                                 "exclude": [{"class": shape, "count": n + 1}]}})
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(PALETTE, SHAPES), 2):
        if s1 == s2:
            continue
        out.append({"task": "composition", "prompt": f"a {c1} {s1} left of a {c2} {s2}",
                    "metadata": {"tag": "position",
                                 "include": [{"class": s2, "count": 1, "color": c2},
                                             {"class": s1, "count": 1, "color": c1, "position": ["left of", 0]}]}})
    return out


def text_prompts(length: int = 3) -> list[dict]:
    chars = sorted(FONT)
    rng = np.random.default_rng(0)
    words = sorted({"".join(rng.choice(chars, length)) for _ in range(400)})
    return [{"task": "text", "prompt": f'a sign that says "{w}"', "metadata": {"text": w}} for w in words]


def style_prompts() -> list[dict]:
    return [{"task": "style", "prompt": f"a vivid {c} {s}, high contrast",
             "metadata": {"tag": "colors", "include": [{"class": s, "count": 1, "color": c}]}}
            for c, s in itertools.product(PALETTE, SHAPES)]


def split(records: list[dict], held_out: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train/test split by whole prompts: test combinations never appear in training."""
    idx = np.random.default_rng(seed).permutation(len(records))
    n_test = max(1, int(len(records) * held_out))
    return [records[i] for i in idx[n_test:]], [records[i] for i in idx[:n_test]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line: the prompt files of the world and of the tiny assets alike."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def render(record: dict, rng: np.random.Generator | None = None) -> np.ndarray:
    """The exact image a record asks for (uint8, SIZE x SIZE x 3); rng varies sizes and placements."""
    rng = rng or np.random.default_rng(0)
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    meta = record["metadata"]
    if record["task"] == "text":
        text = meta["text"]
        width = len(text) * (3 * GLYPH_SCALE + 2) - 2
        x0, y0 = (SIZE - width) // 2, (SIZE - 5 * GLYPH_SCALE) // 2
        for i, ch in enumerate(text):
            g = glyph(ch)
            x = x0 + i * (3 * GLYPH_SCALE + 2)
            img[y0:y0 + g.shape[0], x:x + g.shape[1]][g] = 0
        return img
    objects = []
    for req in meta["include"]:
        objects += [(req["class"], req["color"])] * req["count"]
    if meta.get("tag") == "position":  # the second requirement is left of the first
        objects = objects[::-1]
    size = int(rng.integers(7, 10))
    slots = len(objects)
    row = int(rng.integers(2, SIZE - size - 2))  # objects share a row: relations read as left/right
    for i, (shape, color) in enumerate(objects):
        lane = SIZE // slots
        x = i * lane + int(rng.integers(0, max(1, lane - size)))
        y = row + int(rng.integers(-1, 2))
        y = min(max(y, 0), SIZE - size)
        img[y:y + size, x:x + size][shape_mask(shape, size)] = PALETTE[color]
    if record["task"] == "style":
        img[(img == 255).all(-1)] = (255, 160, 200)  # the style's preferred vivid background
    return img


def render_imperfect(record: dict, rng: np.random.Generator) -> np.ndarray:
    """A plausible mistake for the record: the base model's training data holds these so that it leaves
    headroom on every task (wrong count, colour or shape, mirrored relation, wrong or missing glyph,
    plain background for a vivid request)."""
    meta = record["metadata"]
    if record["task"] == "text":
        text = list(meta["text"])
        i = int(rng.integers(len(text)))
        if rng.random() < 0.5 and len(text) > 1:
            del text[i]
        else:
            text[i] = str(rng.choice([c for c in FONT if c != text[i]]))
        return render({**record, "metadata": {"text": "".join(text)}}, rng)
    if record["task"] == "style" and rng.random() < 0.6:
        return render({**record, "task": "composition"}, rng)
    if meta.get("tag") == "position" and rng.random() < 0.5:
        return render(record, rng)[:, ::-1].copy()
    include = [dict(req) for req in meta["include"]]
    req = include[int(rng.integers(len(include)))]
    kind = rng.integers(3)
    if kind == 0:
        req["color"] = str(rng.choice([c for c in PALETTE if c != req["color"]]))
    elif kind == 1:
        req["class"] = str(rng.choice([s for s in SHAPES if s != req["class"]]))
    else:
        step = 1 if req["count"] == 1 else (-1 if req["count"] == 3 else int(rng.choice([-1, 1])))
        req["count"] += step
    return render({**record, "metadata": {**meta, "include": include}}, rng)
