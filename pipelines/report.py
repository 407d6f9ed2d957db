"""Reports of an evaluation: a Table-2 layout with confidence intervals, claims stated with their paired
bootstrap CIs ("not shown" when the CI includes 0), training curves and labelled sample grids. Shared by
the demo and the stage-1 job."""
import json
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from flowopd.stats import Estimate, bootstrap_mean, verdict


class Results:
    """Per-image scores of an evaluation directory, with each task scored by its primary reward output."""

    def __init__(self, eval_dir: Path, task_columns: dict[str, str]):
        self.table = {k: np.asarray(v) for k, v in pq.read_table(Path(eval_dir) / "results.parquet").to_pydict().items()}
        self.columns = task_columns
        self.tasks = sorted(task_columns)
        self.models = list(dict.fromkeys(self.table["model"].tolist()))

    def scores(self, model: str, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(scores, prompt of each) for the model's images of the task, in (prompt, seed) order."""
        t = self.table
        mine = np.nonzero((t["model"] == model) & (t["task"] == task))[0]
        order = mine[np.lexsort((t["seed"][mine], t["prompt"][mine]))]
        return t[self.columns[task]][order].astype(np.float64), t["prompt"][order]

    def mean(self, model: str, task: str | None = None) -> Estimate:
        """A task's mean (or, task None, the average over tasks) with its 95% CI."""
        return self._boot([model], lambda s: s[0], task)

    def diff(self, a: str, b: str, task: str | None = None) -> Estimate:
        """a - b on the same prompts and seeds: one task, or the average over tasks."""
        return self._boot([a, b], lambda s: s[0] - s[1], task)

    def _boot(self, models, combine, task) -> Estimate:
        values, strata, groups = [], [], []
        for t in ([task] if task else self.tasks):
            scored = [self.scores(m, t) for m in models]
            if any(not np.array_equal(scored[0][1], s[1]) for s in scored):
                raise ValueError(f"{models} were not evaluated on the same {t} prompts and seeds")
            values.append(combine([s[0] for s in scored]))
            strata.append(scored[0][1])
            groups += [t] * len(scored[0][1])
        return bootstrap_mean(np.concatenate(values), np.concatenate(strata), np.asarray(groups))


def task_columns(eval_cfg, summary: dict) -> dict[str, str]:
    """{task: column}: the primary output of the evaluation reward that scores each task."""
    out = {}
    for s in summary.values():
        for task, cols in s["per_task"].items():
            spec = next(sp for sp in eval_cfg.rewards if sp.applies_to(task))
            out.setdefault(task, next(c for c in cols if c.startswith(spec.key + "/")))
    return dict(sorted(out.items()))


def table_rows(res: Results, order: list[str]) -> dict[str, dict[str, Estimate]]:
    """Rows in `order` (those evaluated) x tasks and the average, each a mean with its CI."""
    return {m: {**{t: res.mean(m, t) for t in res.tasks}, "average": res.mean(m)} for m in order if m in res.models}


def markdown_table(tasks: list[str], rows: dict[str, dict[str, Estimate]]) -> str:
    """Means with their 95% CI half-widths; the best mean of each column in bold."""
    cols = [*tasks, "average"]
    best = {c: max(r[c].mean for r in rows.values()) for c in cols}
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [(f"**{r[c].mean:.3f}**" if r[c].mean == best[c] else f"{r[c].mean:.3f}") + f" ± {r[c].half_width:.3f}"
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rows_json(rows: dict[str, dict[str, Estimate]]) -> dict:
    return {m: {c: {"mean": e.mean, "lo": e.lo, "hi": e.hi, "n": e.n} for c, e in r.items()} for m, r in rows.items()}


def teacher_claims(res: Results, route: dict[str, str]) -> list[str]:
    """Each task's teacher against the base on that task."""
    return [f"* {verdict(res.diff(teacher, 'base', task), f'{task}: {teacher} − base')}"
            for task, teacher in route.items() if teacher in res.models and "base" in res.models]


def reach_claims(res: Results, student: str, route: dict[str, str], reach: float, of: str = "the teacher") -> list[str]:
    """The student against each routed teacher (`of` in the text) on that teacher's task: the ratio and the
    paired CI."""
    lines = []
    for task, teacher in route.items():
        if teacher in res.models and student in res.models:
            d, t = res.diff(student, teacher, task), res.mean(teacher, task).mean
            ratio = (t + d.mean) / t if t else float("nan")
            lines.append(f"* {verdict(d, f'{task}: {student} − {teacher}')}; {student} reaches {ratio:.1%} of "
                         f"{of} ({'≥' if ratio >= reach else '<'} {reach:.0%})")
    return lines


def comparison_claims(res: Results, pairs: list[tuple[str, str]]) -> list[str]:
    return [f"* {verdict(res.diff(a, b), f'average: {a} − {b}')}" for a, b in pairs if {a, b} <= set(res.models)]


def _task_figure(tasks: list[str], path: Path, xlabel: str, ylabel: str, draw) -> None:
    """One panel per task, filled by draw(ax, task), saved as a PNG."""
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        draw(ax, task)
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(out: Path, stages: list[str], tasks: list[str], path: Path) -> None:
    """Per-task mean reward of each training stage's rollouts (moving average over 5 steps)."""
    def draw(ax, task):
        for stage in stages:
            f = out / stage / "metrics.jsonl"
            if not f.exists():
                continue
            pts = [(m["step"], m["reward_per_task"][task]) for m in map(json.loads, f.read_text().splitlines())
                   if task in m.get("reward_per_task", {})]
            if pts:
                steps, vals = map(np.asarray, zip(*pts))
                k = min(5, len(vals))
                ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"),
                        label=stage.removeprefix("teachers/"))
    _task_figure(tasks, path, "step", "rollout reward", draw)


def probe_curve(path: Path) -> list[dict]:
    """A GRPO job's probe.jsonl as a curve: per probe step and task, the held-out reward and its gain over
    step 0 (paired per image: the same prompts, seeds and noise), each with its 95% CI."""
    lines = [json.loads(ln) for ln in Path(path).read_text().splitlines()]
    rewards = [np.asarray([np.nan if v is None else v for v in ln["reward"]], dtype=np.float64) for ln in lines]
    base = next((r for ln, r in zip(lines, rewards) if ln["step"] == 0), None)
    points = []
    for ln, reward in zip(lines, rewards):
        k = ln["samples_per_prompt"]  # one count per prompt
        strata, tasks = np.repeat(np.arange(len(ln["prompts"])), k), np.repeat(ln["tasks"], k)
        point = {"step": ln["step"], "samples": ln["samples"]}
        scored = np.isfinite(reward) if base is None else np.isfinite(reward) & np.isfinite(base)
        for task in sorted(set(ln["tasks"])):
            sel = (tasks == task) & scored
            point[task] = vars(bootstrap_mean(reward[sel], strata[sel]))
            if base is not None:
                point[f"{task}_gain"] = vars(bootstrap_mean(reward[sel] - base[sel], strata[sel]))
        points.append(point)
    return points


def probe_plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Held-out probe reward against training samples, one line per job, shaded 95% CIs; a panel per task."""
    tasks = sorted({k for pts in curves.values() for p in pts for k in p
                    if k not in ("step", "samples") and not k.endswith("_gain")})

    def draw(ax, task):
        for name, pts in curves.items():
            pts = [p for p in pts if task in p]
            if pts:
                x = [p["samples"] for p in pts]
                ax.plot(x, [p[task]["mean"] for p in pts], marker=".", label=name)
                ax.fill_between(x, [p[task]["lo"] for p in pts], [p[task]["hi"] for p in pts], alpha=0.2)
    _task_figure(tasks, path, "training samples", "probe reward (held-out, ODE)", draw)


def sample_grid(eval_dir: Path, models: list[str], task: str, path: Path, scale: int = 3, columns: int = 8) -> None:
    """One row per model, one column per held-out prompt (its first seed, the same for every model), the
    prompt written above its column."""
    rows, prompts = [], None
    for name in models:
        f = Path(eval_dir) / "grids" / name / f"{task}.png"
        if f.exists():
            g = np.asarray(Image.open(f).convert("RGB"))
            side = g.shape[0]
            rows.append((name, [g[:, c:c + side] for c in range(0, g.shape[1], side)][:columns]))
            meta = f.with_suffix(".json")
            if prompts is None and meta.exists():
                prompts = json.loads(meta.read_text())["prompts"][:columns]
    if not rows:
        return
    side = rows[0][1][0].shape[0] * scale
    label_w, n_cols = 130, max(len(r) for _, r in rows)
    wrap = max(8, side // 6)
    header = [textwrap.wrap(p, wrap) for p in (prompts or [])]
    head_h = 12 * max((len(h) for h in header), default=0) + 6
    canvas = Image.new("RGB", (label_w + n_cols * side, head_h + len(rows) * side), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(header):
        for i, line in enumerate(lines):
            draw.text((label_w + c * side + 2, 2 + 12 * i), line, fill="black")
    for r, (name, tiles) in enumerate(rows):
        y = head_h + r * side
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile).resize((side, side), Image.NEAREST), (label_w + c * side, y))
        draw.text((4, y + side // 2 - 6), name, fill="black")
    canvas.save(path)
