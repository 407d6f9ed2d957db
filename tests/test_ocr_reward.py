"""The OCR reward with the real shipped engine (rapidocr, offline) and Flow-GRPO's edit-distance rule."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rewards import make_reward
from rewards.ocr import edit_distance, ocr_score


def render(text: str) -> np.ndarray:
    im = Image.new("RGB", (320, 128), "white")
    ImageDraw.Draw(im).text((12, 40), text, fill="black", font=ImageFont.load_default(size=36))
    return np.asarray(im)


def test_rule_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert ocr_score("A sign: Hello World!", "hello world") == 1.0  # substring, spaces and case ignored
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("", "open") == 0.0
    assert ocr_score("completely different text", "abc") == 0.0  # distance capped at len(target)


@pytest.fixture(scope="module")
def ocr():
    return make_reward("ocr")


def test_rendered_text_scores_high_for_its_prompt_and_low_otherwise(ocr):
    images = np.stack([render("Hello World"), render("sale 50"), np.full((128, 320, 3), 255, np.uint8)])
    prompts = ['a sign that says "Hello World"', 'a poster with "sale 50"', 'a wall with "nothing"']
    right = ocr(images, prompts, [{}] * 3)
    assert right["ocr"][:2].tolist() == [1.0, 1.0] and right["ocr_exact"][:2].tolist() == [1.0, 1.0]
    assert right["ocr"][2] == 0.0  # blank image
    wrong = ocr(images[:2], ['a sign "zebra"', 'a poster "quartz 9"'], [{}] * 2)
    assert (wrong["ocr"] < 0.5).all()
    partial = ocr(images[:1], ['a sign "Hello Wor1d"'], [{}])  # one character off: 1 - 1/10
    assert partial["ocr"][0] == pytest.approx(0.9)
    # metadata's target (from the OCR prompt reader) takes precedence over the prompt's quotes
    assert ocr(images[1:2], ["anything"], [{"text": "sale 50"}])["ocr"][0] == 1.0
