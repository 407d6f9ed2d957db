"""Flow-OPD end to end in the one-machine world (issue 6): the README's main command.

    python -m pipelines.demo                       # configs/demo.yaml, about 15 minutes on 2 CPU cores
    python -m pipelines.demo --quick               # every stage for a couple of steps (CI, smoke test)
    python -m pipelines.demo --config my.yaml opd.train.steps=80

Runs the recipe (pipelines/recipe.py) on the shipped world base model: a GRPO teacher per task, the
GRPO-Mix baseline, the cold start, OPD without and with MAR, and an evaluation of every model on held-out
prompts; then writes <output_dir>/report/: report.md (a table in the layout of the paper's Table 2 and
what it shows), curves.png (per-task reward of the rollouts over training, for every training stage)
and grid_<task>.png (held-out samples, one row per model). Rerunning resumes; finished stages are kept.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from flowopd.config import ConfigError
from flowopd.data import DataError
from pipelines.recipe import Recipe, load_recipe

ROWS = ("base", "grpo_mix", "cold_start", "opd_without_mar", "opd")  # teachers go after base
REACHES = 0.95  # "reaches the teacher": at least this fraction of the teacher's score on its own task


def shorten(raw: dict, steps: int) -> dict:
    """--quick: every training stage runs `steps` small steps on one worker and one rank; evaluation uses
    few prompts and sampling steps. A smoke test of every stage, not a result."""
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("train"), dict):
                node["train"].update(steps=steps, checkpoint_every=steps)
            for v in node.values():
                walk(v)
    walk(raw)
    d = raw.setdefault("defaults", {})
    d.setdefault("rollout", {})["workers"] = 1
    d.setdefault("learner", {})["ranks"] = 1
    d.setdefault("data", {}).update(prompts_per_step=3, group_size=4)
    d.setdefault("sampling", {})["num_steps"] = 6
    ev = raw.setdefault("evaluate", {})
    ev.setdefault("data", {})["max_prompts_per_source"] = 3
    ev["samples_per_prompt"] = 1
    ev.setdefault("sampling", {})["num_steps"] = 6
    return raw


def task_metrics(recipe: Recipe, summary: dict) -> dict[str, str]:
    """{task: column}: the primary output of the evaluation reward that scores each task."""
    specs = recipe.stages["evaluate"].rewards
    out = {}
    for s in summary.values():
        for task, cols in s["per_task"].items():
            spec = next(sp for sp in specs if sp.applies_to(task))
            out.setdefault(task, next(c for c in cols if c.startswith(spec.key + "/")))
    return dict(sorted(out.items()))


def table(recipe: Recipe, summary: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Rows in the paper's order (base, teachers, GRPO-Mix, cold start, OPD w/o MAR, OPD) x task scores."""
    metrics = task_metrics(recipe, summary)
    order = ["base", *recipe.teachers, *ROWS[1:]]
    rows = {}
    for name in [m for m in order if m in summary]:
        per_task = summary[name]["per_task"]
        rows[name] = {t: per_task.get(t, {}).get(col, float("nan")) for t, col in metrics.items()}
        rows[name]["average"] = float(np.mean([rows[name][t] for t in metrics]))
    return list(metrics), rows


def findings(recipe: Recipe, tasks: list[str], rows: dict) -> list[str]:
    """The questions the demo exists to answer, answered from the table."""
    lines = []
    route = recipe.stages["opd"].route
    if "opd" in rows:
        for task in tasks:
            teacher = route.get(task)
            if teacher in rows:
                t, s = rows[teacher][task], rows["opd"][task]
                if "base" in rows:
                    b = rows["base"][task]
                    lines.append(f"* {task}: {teacher} {t:.3f} vs base {b:.3f} ({t - b:+.3f}): stage 1 "
                                 f"{'improved' if t > b else 'did not improve'} the base on its own task.")
                verdict = "reaches" if s >= REACHES * t else "does not reach"
                lines.append(f"* {task}: OPD {s:.3f} vs {teacher} {t:.3f}: {verdict} the teacher "
                             f"({s / t:.0%} of its score; 'reaches' means at least {REACHES:.0%}).")
        if "grpo_mix" in rows:
            o, g = rows["opd"]["average"], rows["grpo_mix"]["average"]
            lines.append(f"* Average: OPD {o:.3f} vs GRPO-Mix {g:.3f}: OPD {'beats' if o > g else 'does not beat'} "
                         f"GRPO-Mix ({o - g:+.3f}).")
        if "opd_without_mar" in rows:
            o, w = rows["opd"]["average"], rows["opd_without_mar"]["average"]
            lines.append(f"* MAR: average {o:.3f} with, {w:.3f} without ({o - w:+.3f}).")
    return lines


def markdown_table(tasks: list[str], rows: dict) -> str:
    cols = [*tasks, "average"]
    best = {c: max(r[c] for r in rows.values()) for c in cols}
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"**{r[c]:.3f}**" if r[c] == best[c] else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def training_curves(out: Path, stages: list[str], tasks: list[str], path: Path) -> None:
    """Per-task mean reward of each training stage's rollouts (moving average over 5 steps)."""
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for stage in stages:
            f = out / stage / "metrics.jsonl"
            if not f.exists():
                continue
            pts = [(m["step"], m["reward_per_task"][task]) for m in map(json.loads, f.read_text().splitlines())
                   if task in m.get("reward_per_task", {})]
            if pts:
                steps, vals = map(np.asarray, zip(*pts))
                k = min(5, len(vals))
                smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
                ax.plot(steps[k - 1:], smooth, label=stage.removeprefix("teachers/"))
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("rollout reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(eval_dir: Path, models: list[str], task: str, path: Path, scale: int = 3, per_row: int = 8) -> None:
    """One row per model: its first held-out samples for the task (same seeds for every model)."""
    rows = []
    for name in models:
        f = eval_dir / "grids" / name / f"{task}.png"
        if f.exists():
            g = np.asarray(Image.open(f).convert("RGB"))
            side = g.shape[1] // 4  # evaluate writes 4 images per grid row
            tiles = [g[r:r + side, c:c + side] for r in range(0, g.shape[0], side) for c in range(0, 4 * side, side)]
            rows.append((name, np.concatenate(tiles[:per_row], axis=1)))
    if not rows:
        return
    label_w, width = 130, max(r.shape[1] for _, r in rows) * scale
    canvas = Image.new("RGB", (label_w + width, len(rows) * rows[0][1].shape[0] * scale), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, r in rows:
        tile = Image.fromarray(r).resize((r.shape[1] * scale, r.shape[0] * scale), Image.NEAREST)
        canvas.paste(tile, (label_w, y))
        draw.text((4, y + tile.height // 2 - 6), name, fill="black")
        y += tile.height
    canvas.save(path)


def stage_times(recipe: Recipe, minutes: float) -> str:
    """Minutes per stage (from each stage's DONE.json) and this invocation's wall time."""
    times = {}
    for stage in recipe.stages:
        done = recipe.out / stage / "DONE.json"
        if done.exists() and "minutes" in (d := json.loads(done.read_text())):
            times[stage] = d["minutes"]
    parts = ", ".join(f"{s} {m:.1f}" for s, m in times.items())
    per_stage = f"Minutes per stage: {parts} (sum {sum(times.values()):.1f}). " if times else ""
    return (f"{per_stage}This invocation: {minutes:.1f} min (stages finished by an earlier invocation are "
            f"skipped).")


def write_report(recipe: Recipe, minutes: float) -> Path:
    out = recipe.out
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    tasks, rows = table(recipe, summary)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    training = [s for s in recipe.stages if s != "evaluate" and s != "cold_start"]
    training_curves(out, training, tasks, rep / "curves.png")
    for task in tasks:
        sample_grid(out / "evaluate", list(rows), task, rep / f"grid_{task}.png")
    ev = recipe.stages["evaluate"]
    intro = (f"Held-out prompts, {ev.samples_per_prompt} samples each, ODE sampling with {ev.sampling.num_steps} "
             f"steps and guidance {ev.sampling.guidance}; every model sees the same seeds. Each task column is "
             f"the mean of that task's reward ({', '.join(task_metrics(recipe, summary).values())}).")
    text = ["# Flow-OPD demo report", "", intro, "",
            markdown_table(tasks, rows), "## What it shows", "", *findings(recipe, tasks, rows), "",
            stage_times(recipe, minutes), "",
            "Training curves: `curves.png`; samples: " + ", ".join(f"`grid_{t}.png`" for t in tasks) + "; "
            "per-image scores: `../evaluate/results.parquet`."]
    (rep / "report.md").write_text("\n".join(text) + "\n")
    (rep / "table.json").write_text(json.dumps(rows, indent=1))
    return rep / "report.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--quick", action="store_true", help="2 steps per training stage, a small evaluation")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe file")
    args = ap.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides, (lambda raw: shorten(raw, 2)) if args.quick else None)
        base = Path(recipe.defaults.get("model", {}).get("base", ""))
        if not base.exists():
            raise ConfigError(f"defaults.model.base: {base} does not exist (the world model ships in "
                              f"assets/world; `python -m pipelines.train_world` rebuilds it)")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    recipe.out.mkdir(parents=True, exist_ok=True)
    recipe.run(progress=not args.no_progress)
    report = write_report(recipe, (time.time() - started) / 60)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
