"""A text-to-image world small enough for one CPU: prompts from a grammar for three tasks,
and exact renderings of what each prompt asks for, so rewards can be exact programs.

* composition: coloured shapes with counts and left/right relations (GenEval-style metadata);
* text: short strings drawn with a 3x5 bitmap font (OCR-style metadata: the target text);
* style: a "vivid" request scored by saturation, a preference-like reward that is easy to hack and pulls
  against the other two (a saturated background hides shapes and glyphs).
Images are 32x32 RGB on a white background; `render`'s layout says where composition objects go.
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


def unseen_recombinations(train: list[dict], n_text: int = 60, seed: int = 0) -> list[dict]:
    """Held-out prompts that recombine nothing seen in training, for a generalisation check beside the
    ordinary held-out split:
    * text: strings of the training alphabet and length in which no two (character, position) pairs ever
      occurred together in a training string (every character may have been seen at its position, but never
      with these neighbours);
    * composition: left/right relations between two objects (colour and shape) that no training prompt puts
      together, in either order."""
    pairs = {frozenset(((a, i), (b, j))) for r in train if r["task"] == "text"
             for i, a in enumerate(r["metadata"]["text"]) for j, b in enumerate(r["metadata"]["text"]) if i < j}
    seen_text = {r["metadata"]["text"] for r in train if r["task"] == "text"}
    length = len(next(iter(seen_text)))
    chars = sorted(FONT)
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < n_text:
        w = "".join(rng.choice(chars, length))
        if w not in words and not any(frozenset(((w[i], i), (w[j], j))) in pairs
                                      for i in range(length) for j in range(i + 1, length)):
            words.append(w)
    out = [{"task": "text", "prompt": f'a sign that says "{w}"', "metadata": {"text": w}} for w in words]
    together = {frozenset(f"{q['color']} {q['class']}" for q in r["metadata"]["include"])
                for r in train if r["task"] == "composition" and r["metadata"]["tag"] == "position"}
    out += [r for r in composition_prompts() if r["metadata"]["tag"] == "position" and frozenset(
        f"{q['color']} {q['class']}" for q in r["metadata"]["include"]) not in together]
    return out


def split(records: list[dict], held_out: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train/test split by whole prompts: test combinations never appear in training."""
    idx = np.random.default_rng(seed).permutation(len(records))
    n_test = max(1, int(len(records) * held_out))
    return [records[i] for i in idx[n_test:]], [records[i] for i in idx[:n_test]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line: the prompt files of the world and of the tiny assets alike."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


LAYOUTS = ("grid", "row")  # how composition objects are placed: see `render`


def render(record: dict, rng: np.random.Generator | None = None, layout: str = "grid") -> np.ndarray:
    """The exact image a record asks for (uint8, SIZE x SIZE x 3); rng varies sizes and placements.

    Layout "grid" (the default) draws objects 10-12 px wide, a group in distinct cells of a 2x2 grid and a
    left/right pair in the two halves, so no two objects ever touch and each shape stays distinct after the
    VAE. "row" is the first world's layout (assets/world): 7-9 px objects in one row, same-colour
    neighbours may touch."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
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
    place = _grid_places if layout == "grid" else _row_places
    for (shape, color), (x, y, size) in zip(objects, place(len(objects), meta.get("tag") == "position", rng)):
        img[y:y + size, x:x + size][shape_mask(shape, size)] = PALETTE[color]
    if record["task"] == "style":
        img[(img == 255).all(-1)] = (255, 160, 200)  # the style's preferred vivid background
    return img


def _row_places(n: int, ordered: bool, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    size = int(rng.integers(7, 10))
    row = int(rng.integers(2, SIZE - size - 2))  # objects share a row: relations read as left/right
    lane = SIZE // n
    return [(i * lane + int(rng.integers(0, max(1, lane - size))),
             min(max(row + int(rng.integers(-1, 2)), 0), SIZE - size), size) for i in range(n)]


def _grid_places(n: int, ordered: bool, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(x, y, size) per object: a left/right pair in the two halves at one height (+-2 px); otherwise
    (or a pair's mistake with a third object) distinct random cells of the 2x2 grid. Margins inside each 16-px cell keep objects 3 px apart."""
    cell = SIZE // 2
    size = int(rng.integers(10, 13))
    if ordered and n == 2:
        y = int(rng.integers(1, SIZE - size))
        return [(i * cell + int(rng.integers(1, cell - size - 1)),
                 min(max(y + int(rng.integers(-2, 3)), 0), SIZE - size), size) for i in range(n)]
    cells = rng.permutation(4)[:n] if n > 1 else [None]
    out = []
    for c in cells:
        if c is None:  # a single object anywhere
            out.append((int(rng.integers(0, SIZE - size + 1)), int(rng.integers(0, SIZE - size + 1)), size))
        else:
            out.append(((c % 2) * cell + int(rng.integers(1, cell - size - 1)),
                        (c // 2) * cell + int(rng.integers(1, cell - size - 1)), size))
    return sorted(out)  # left to right, like the row layout


def render_imperfect(record: dict, rng: np.random.Generator, layout: str = "grid") -> np.ndarray:
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
        return render({**record, "metadata": {"text": "".join(text)}}, rng, layout)
    if record["task"] == "style" and rng.random() < 0.6:
        return render({**record, "task": "composition"}, rng, layout)
    if meta.get("tag") == "position" and rng.random() < 0.5:
        return render(record, rng, layout)[:, ::-1].copy()
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
    return render({**record, "metadata": {**meta, "include": include}}, rng, layout)
