"""GenEval's rules on hand-made detections, and the whole GenEval reward path on a tiny random detector
(and CLIP colour classifier) saved to a temp dir: plumbing, not accuracy."""
import numpy as np
import pytest
import torch
from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

from rewards import make_reward
from rewards.geneval import evaluate, relative_position


def box(x0, y0, x1, y1, score=0.95):
    return ([x0, y0, x1, y1], score)


def test_relative_positions():
    a, b = [0, 0, 10, 10], [50, 0, 60, 10]
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position([0, 0, 10, 10], [0, 50, 10, 60]) == {"above"}
    assert relative_position([0, 0, 10, 10], [1, 1, 11, 11]) == set()  # inside the dead zone


def test_counting_colours_and_positions_by_hand():
    two_cats = {"cat": [box(0, 0, 10, 10), box(20, 0, 30, 10)]}
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    assert evaluate(two_cats, counting)[:2] == (1.0, 1.0)
    three = {"cat": two_cats["cat"] + [box(40, 0, 50, 10)]}
    assert evaluate(three, counting)[:2] == (0.5, 0.0)  # enough cats, but one too many
    assert evaluate({"cat": two_cats["cat"][:1]}, counting)[:2] == (0.5, 0.0)

    colors = {"include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bus", "count": 1, "color": "blue"}]}
    objs = {"car": [box(0, 0, 5, 5)], "bus": [box(10, 0, 15, 5)]}
    painted = {"car": "red", "bus": "green"}
    p, s, reasons = evaluate(objs, colors, lambda cls, found: [painted[cls]] * len(found))
    assert (p, s) == (0.5, 0.0) and "expected blue bus" in reasons[0]
    with pytest.raises(ValueError, match="colour classifier"):
        evaluate(objs, colors)

    position = {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    left = {"dog": [box(60, 0, 70, 10)], "cat": [box(0, 0, 10, 10)]}
    right = {"dog": [box(0, 0, 10, 10)], "cat": [box(60, 0, 70, 10)]}
    assert evaluate(left, position)[:2] == (1.0, 1.0)
    assert evaluate(right, position)[:2] == (0.5, 0.0)
    assert evaluate({"cat": [box(0, 0, 10, 10)]}, position)[:2] == (0.0, 0.0)  # no dog: no target group


def test_whole_path_on_a_tiny_random_detector(tmp_path, clip_dir):
    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "car"}
    cfg = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=[64, 64], patch_size=16, num_detection_tokens=8, num_labels=3,
                      id2label=labels, label2id={v: k for k, v in labels.items()})
    YolosForObjectDetection(cfg).eval().save_pretrained(tmp_path / "det")
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(tmp_path / "det")
    reward = make_reward("geneval", {"detector_path": str(tmp_path / "det"), "clip_path": str(clip_dir),
                                     "device": "cpu"})
    reward.detect = _with_low_threshold(reward.detect)  # random weights: keep every detection
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]},
            {"tag": "counting", "include": [{"class": "car", "count": 2}], "exclude": [{"class": "car", "count": 3}]}]
    out = reward(images, ["a cat", "a red dog", "two cars"], meta)
    assert set(out) == {"geneval", "geneval_strict"} and out["geneval"].shape == (3,)
    assert ((0 <= out["geneval"]) & (out["geneval"] <= 1)).all()
    assert set(out["geneval_strict"].tolist()) <= {0.0, 1.0}


def _with_low_threshold(detect):
    return lambda image, threshold: detect(image, 0.0)
