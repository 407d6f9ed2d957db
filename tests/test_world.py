"""The one-machine world: rendered ground truth scores 1 under its exact verifiers, and perturbed images
score what they should."""
import numpy as np
import pytest

from rewards import make_reward
from world.grammar import (
    LAYOUTS,
    PALETTE,
    SHAPES,
    SIZE,
    composition_prompts,
    render,
    shape_mask,
    split,
    style_prompts,
    text_prompts,
    unseen_recombinations,
)
from world.verifiers import SHAPE_RULES

COMP, TEXT, STYLE = make_reward("world_composition"), make_reward("world_text"), make_reward("world_style")


def _score(reward, records, images):
    return reward(np.stack(images), [r["prompt"] for r in records], [r["metadata"] for r in records])


def test_rendered_ground_truth_scores_one():
    comp = composition_prompts()
    rng = np.random.default_rng(1)
    out = _score(COMP, comp, [render(r, rng) for r in comp])
    assert out["composition_strict"].mean() == 1.0, [r["prompt"] for r, s in zip(comp, out["composition_strict"]) if s < 1]
    text = text_prompts()
    out = _score(TEXT, text, [render(r) for r in text])
    assert out["text_exact"].mean() == 1.0


def test_perturbations_score_what_they_should():
    two = next(r for r in composition_prompts() if r["prompt"] == "two red squares")
    img = render(two, np.random.default_rng(0))
    one_left = img.copy()
    ys, xs = _objects(img)[-1].T
    one_left[ys, xs] = 255  # erase one square
    assert _score(COMP, [two], [one_left])["composition"][0] == pytest.approx(0.5)
    recolored = img.copy()
    recolored[(recolored == PALETTE["red"]).all(-1)] = PALETTE["blue"]
    assert _score(COMP, [two], [recolored])["composition"][0] == pytest.approx(0.5)  # colour wrong, count ok

    pos = next(r for r in composition_prompts() if r["prompt"] == "a red square left of a blue circle")
    img = render(pos, np.random.default_rng(0))
    assert _score(COMP, [pos], [img])["composition_strict"][0] == 1.0
    assert _score(COMP, [pos], [img[:, ::-1]])["composition"][0] == pytest.approx(0.5)  # mirrored: right of

    word = {"task": "text", "prompt": 'a sign that says "a7c"', "metadata": {"text": "a7c"}}
    other = {"task": "text", "prompt": 'a sign that says "a1c"', "metadata": {"text": "a1c"}}
    assert _score(TEXT, [word], [render(other)])["text"][0] == pytest.approx(1 - 1 / 3)
    assert _score(TEXT, [word], [np.full((SIZE, SIZE, 3), 255, np.uint8)])["text"][0] == 0.0


def test_style_pulls_against_the_other_tasks():
    rec = style_prompts()[0]
    plain = render(dict(rec, task="composition"), np.random.default_rng(0))
    vivid = render(rec, np.random.default_rng(0))
    assert _score(STYLE, [rec] * 2, [plain, vivid])["style"].tolist()[0] < _score(STYLE, [rec], [vivid])["style"][0]
    # the hack: saturating everything maximises style and destroys the composition
    hacked = np.zeros_like(vivid)
    hacked[...] = (255, 0, 255)
    assert _score(STYLE, [rec], [hacked])["style"][0] > _score(STYLE, [rec], [vivid])["style"][0]
    assert _score(COMP, [rec], [hacked])["composition"][0] == 0.0


def test_held_out_split_has_unseen_combinations():
    train, test = split(composition_prompts())
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test} and len(test) > 10


def _objects(image: np.ndarray) -> list[np.ndarray]:
    """Each drawn object's (y, x) pixels: 4-connected components of the ink."""
    from world.verifiers import _components
    return _components(~(image == 255).all(-1))


def _gap(a: np.ndarray, b: np.ndarray) -> int:
    """The Chebyshev distance between two pixel sets: 1 + the blank pixels between them."""
    return int(np.abs(a[:, None, :] - b[None, :, :]).max(-1).min())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_layouts_score_one_under_both_shape_rules(layout):
    records = composition_prompts() + style_prompts()
    rng = np.random.default_rng(2)
    images = [render(r, rng, layout) for r in records]
    for rule in SHAPE_RULES:
        out = _score(make_reward("world_composition", {"shape_rule": rule}), records, images)
        assert out["composition_strict"].mean() == 1.0, (layout, rule)


def test_grid_layout_keeps_objects_large_and_apart():
    """Every object of the grid layout is 10-12 px and has at least 3 blank pixels between it and any other
    (so no two merge, even after the VAE's blur); the row layout's 7-9 px same-colour neighbours may touch."""
    rng = np.random.default_rng(0)
    counting = [r for r in composition_prompts() if r["metadata"]["tag"] == "counting"]
    for record in counting * 3:
        objects = _objects(render(record, rng, "grid"))
        assert len(objects) == record["metadata"]["include"][0]["count"], record["prompt"]
        for obj in objects:
            assert 10 <= np.ptp(obj, axis=0).max() + 1 <= 12
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                assert _gap(objects[i], objects[j]) >= 4, record["prompt"]
    row_gaps = [_gap(*_objects(render(r, rng, "row"))[:2]) for r in counting * 3]
    assert min(row_gaps) == 2  # the row layout leaves as little as one blank pixel: what the grid layout fixes


def test_template_rule_reads_shape_not_area():
    """A triangle whose apex a blur has flattened (a trapezoid, top 4 px of 12) fills 69% of its box, which the
    fill rule (0.68-0.9) reads as a circle; the template rule matches it to the triangle (IoU 0.72 against 0.71
    for the inscribed circle). Exact shapes keep their names under both rules."""
    from world.verifiers import classify_shape
    yy, xx = np.mgrid[:12, :12] + 0.5
    blunt = np.abs(xx - 6) <= 2 + 4 * yy / 12
    assert classify_shape(blunt, "fill") == "circle" and classify_shape(blunt, "template") == "triangle"
    for shape in SHAPES:
        for size in (8, 10, 12):
            for rule in SHAPE_RULES:
                assert classify_shape(shape_mask(shape, size), rule) == shape, (shape, size, rule)


def test_unseen_recombinations_share_no_pair_with_training():
    """The generalisation set: no two (character, position) pairs of a text prompt ever occurred together in a
    training string, no relation joins two objects a training relation joined, and no prompt is a training
    prompt (some are in the ordinary held-out split too: that split holds out whole prompts only)."""
    train, test = [], []
    for records in (composition_prompts(), text_prompts()):
        tr, te = split(records)
        train, test = train + tr, test + te
    unseen = unseen_recombinations(train)
    assert {r["task"] for r in unseen} == {"text", "composition"}
    assert not {r["prompt"] for r in unseen} & {r["prompt"] for r in train}
    seen_pairs = {(i, a, j, b) for r in train if r["task"] == "text" for i, a in enumerate(r["metadata"]["text"])
                  for j, b in enumerate(r["metadata"]["text"]) if i < j}
    for r in unseen:
        if r["task"] == "text":
            w = r["metadata"]["text"]
            assert not any((i, w[i], j, w[j]) in seen_pairs for i in range(3) for j in range(i + 1, 3)), w
        else:
            objects = {f"{q['color']} {q['class']}" for q in r["metadata"]["include"]}
            for t in train:
                if t["task"] == "composition" and t["metadata"]["tag"] == "position":
                    assert {f"{q['color']} {q['class']}" for q in t["metadata"]["include"]} != objects
