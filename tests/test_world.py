"""The one-machine world: rendered ground truth scores 1 under its exact verifiers, and perturbed images
score what they should."""
import numpy as np
import pytest

from rewards import make_reward
from world.grammar import PALETTE, SIZE, composition_prompts, render, split, style_prompts, text_prompts

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
    one_left[:, SIZE // 2:] = 255  # erase the right square
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
