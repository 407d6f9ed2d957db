"""Prompt readers for Flow-GRPO's formats and Parquet/JSONL, and the resumable mixing sampler."""
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowopd.data import DataError, MixtureSampler, PromptRecord, read_source


def test_geneval_reader_keeps_metadata(tmp_path):
    p = tmp_path / "train_metadata.jsonl"
    p.write_text(json.dumps({"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"})
                 + "\n\n" + json.dumps({"tag": "colors", "include": [], "prompt": "a red ball"}) + "\n")
    recs = read_source(str(p), "geneval", None)
    assert [r.prompt for r in recs] == ["two cats", "a red ball"]
    assert recs[0].task == "geneval" and recs[0].metadata["include"][0]["count"] == 2


def test_malformed_lines_name_file_and_line(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:2"):
        read_source(str(p), "geneval", None)
    o = tmp_path / "ocr.txt"
    o.write_text('a sign "open"\na sign without quotes\n')
    with pytest.raises(DataError, match=r"ocr\.txt:2.*double quotes"):
        read_source(str(o), "ocr", None)


def test_ocr_and_pickscore_txt(tmp_path):
    o = tmp_path / "train.txt"
    o.write_text('A sign that says "Hello World" at night\n')
    (r,) = read_source(str(o), "ocr", None)
    assert r.task == "ocr" and r.metadata == {"text": "Hello World"}
    (r,) = read_source(str(o), "pickscore", None)
    assert r.task == "pickscore" and r.metadata == {}


def test_parquet_and_jsonl_tables(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "task": ["x", "y"]}), tmp_path / "p.parquet")
    recs = read_source(str(tmp_path / "p.parquet"), "parquet", None)
    assert [(r.prompt, r.task) for r in recs] == [("a", "x"), ("b", "y")]
    (tmp_path / "t.jsonl").write_text('{"prompt": "c", "metadata": {"k": 1}}\n')
    (r,) = read_source(str(tmp_path / "t.jsonl"), "jsonl", "z")
    assert r == PromptRecord("c", "z") and r.metadata == {"k": 1}
    with pytest.raises(DataError, match=r"t\.jsonl:1 lacks .* a task"):
        read_source(str(tmp_path / "t.jsonl"), "jsonl", None)
    mixed = {"prompt": "d", "task": "g", "metadata": {"include": [{"position": ["left of", 0]}]}}
    (tmp_path / "m.jsonl").write_text(json.dumps(mixed) + "\n")
    (r,) = read_source(str(tmp_path / "m.jsonl"), "jsonl", None)
    assert r.metadata == mixed["metadata"]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_source(str(tmp_path / "e.txt"), "pickscore", None)
    with pytest.raises(DataError, match="does not exist"):
        read_source(str(tmp_path / "nope.txt"), "pickscore", None)


def test_sampler_mixes_by_weight_and_resumes_exactly():
    a = [PromptRecord(f"a{i}", "a") for i in range(5)]
    b = [PromptRecord(f"b{i}", "b") for i in range(7)]
    s = MixtureSampler([a, b], [3, 1], seed=1)
    counts = Counter(r.task for r in s.draw(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    # each epoch of a source visits every prompt once
    s2 = MixtureSampler([a], [1], seed=2)
    assert sorted(r.prompt for r in s2.draw(5)) == sorted(r.prompt for r in a)

    straight = MixtureSampler([a, b], [1, 1], seed=3)
    first, rest = straight.draw(9), straight.draw(20)
    resumed = MixtureSampler([a, b], [1, 1], seed=3)
    assert resumed.draw(9) == first
    state = json.loads(json.dumps(resumed.state()))
    fresh = MixtureSampler([a, b], [1, 1], seed=3)
    fresh.load_state(state)
    assert fresh.draw(20) == rest
