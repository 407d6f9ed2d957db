"""Prompt data: records {prompt, task, metadata}, Flow-GRPO's file formats, and a resumable mixing sampler."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    task: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)


class DataError(ValueError):
    """A malformed prompt file, reported with its path (and line where there is one)."""


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield i, line.strip()


def _json_objects(path: Path):
    """(line number, object) for each JSON line, parsed with the json module (metadata may mix types,
    e.g. GenEval's ["left of", 0])."""
    for i, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object")
        yield i, obj


def read_geneval(path: Path, task: str) -> list[PromptRecord]:
    """Flow-GRPO GenEval metadata JSONL: one object per line with `prompt`, `tag`, `include`, ..."""
    out = []
    for i, obj in _json_objects(path):
        if not isinstance(obj.get("prompt"), str):
            raise DataError(f"{path}:{i}: expected an object with a string field 'prompt'")
        out.append(PromptRecord(obj["prompt"], task, {k: v for k, v in obj.items() if k != "prompt"}))
    return out


def ocr_target(prompt: str) -> str | None:
    """Flow-GRPO's OCR target: the text between the first pair of double quotes."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def read_txt(path: Path, task: str, ocr: bool = False) -> list[PromptRecord]:
    """One prompt per line (OCR and PickScore files); OCR lines must quote their target text."""
    out = []
    for i, line in _lines(path):
        meta = {}
        if ocr:
            target = ocr_target(line)
            if target is None:
                raise DataError(f'{path}:{i}: OCR prompt has no target text between double quotes')
            meta = {"text": target}
        out.append(PromptRecord(line, task, meta))
    return out


def _table_record(row: dict, task: str | None, where: str) -> PromptRecord:
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    t = row.get("task") or task
    if not isinstance(row.get("prompt"), str) or not t:
        raise DataError(f"{where} lacks a string 'prompt' or a task (a 'task' field, or `task` on the source)")
    return PromptRecord(row["prompt"], t, meta)


def read_jsonl(path: Path, task: str | None) -> list[PromptRecord]:
    """JSON lines with `prompt`, `task` (or the source's task) and any `metadata`."""
    return [_table_record(row, task, f"{path}:{i}") for i, row in _json_objects(path)]


def read_parquet(path: Path, task: str | None) -> list[PromptRecord]:
    """A Parquet table with a `prompt` column, a `task` column (or the source's task) and optionally
    `metadata` (a struct or a JSON string)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from None
    cols = table.column_names
    if "prompt" not in cols:
        raise DataError(f"{path}: no 'prompt' column (columns: {cols})")
    if "task" not in cols and task is None:
        raise DataError(f"{path}: no 'task' column and no `task` given for this source")
    return [_table_record(row, task, f"{path}: row {i}") for i, row in enumerate(table.to_pylist(), 1)]


def read_source(path: str, fmt: str, task: str | None) -> list[PromptRecord]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"prompt file {p} does not exist")
    if fmt in ("geneval", "ocr", "pickscore", "txt") and task is None:
        task = {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore"}.get(fmt)
        if task is None:
            raise DataError(f"{p}: format 'txt' needs a `task`")
    if fmt == "geneval":
        records = read_geneval(p, task)
    elif fmt in ("ocr", "pickscore", "txt"):
        records = read_txt(p, task, ocr=fmt == "ocr")
    elif fmt == "jsonl":
        records = read_jsonl(p, task)
    else:
        records = read_parquet(p, task)
    if not records:
        raise DataError(f"prompt file {p} holds no prompts")
    return records


class MixtureSampler:
    """Draws prompts task by task with mixing weights, walking a seeded permutation of each source.

    Its whole position is `state()` (JSON-safe), so a resumed job continues the same sequence.
    """

    def __init__(self, sources: list[list[PromptRecord]], weights: list[float], seed: int,
                 mixing: str = "per_prompt"):
        if not sources or any(len(s) == 0 for s in sources):
            raise DataError("every data source must hold at least one prompt")
        self.sources, self.seed, self.mixing = sources, seed, mixing
        self.probs = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.cycle = [i for i, w in enumerate(weights) for _ in range(int(w))]  # for alternate mixing
        self.rng = np.random.default_rng(seed)
        self.cursor = [[0, 0] for _ in sources]  # (epoch, position) per source
        self.draws = 0

    def _perm(self, i: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, i, epoch]).permutation(len(self.sources[i]))

    def draw(self, n: int) -> list[PromptRecord]:
        if self.mixing == "alternate":
            picks = [self.cycle[self.draws % len(self.cycle)]] * n
        else:
            picks = self.rng.choice(len(self.sources), size=n, p=self.probs)
        self.draws += 1
        out = []
        for i in picks:
            epoch, pos = self.cursor[i]
            out.append(self.sources[i][self._perm(i, epoch)[pos]])
            self.cursor[i] = [epoch + 1, 0] if pos + 1 == len(self.sources[i]) else [epoch, pos + 1]
        return out

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cursor": [list(c) for c in self.cursor], "draws": self.draws}

    def load_state(self, state: dict) -> None:
        if len(state["cursor"]) != len(self.sources):
            raise DataError("the checkpoint's sampler state has a different number of data sources")
        self.rng.bit_generator.state = state["rng"]
        self.cursor = [list(c) for c in state["cursor"]]
        self.draws = state.get("draws", 0)
