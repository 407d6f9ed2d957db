"""Flow-OPD end to end in the one-machine world: the README's main command.

    python -m pipelines.demo                       # configs/demo.yaml, about 15 minutes on 2 CPU cores
    python -m pipelines.demo --retrain-stage1      # first train stage 1 again (hours), then the same
    python -m pipelines.demo --quick               # every stage for a couple of steps (CI, smoke test)
    python -m pipelines.demo --config my.yaml opd.train.steps=80

Runs the recipe (pipelines/recipe.py) on the shipped world base model and the shipped stage-1 models
(assets/world/stage1: a Flow-GRPO teacher per task, GRPO-Mix and cascade RL, made by pipelines.stage1):
the cold start, OPD with and without MAR, and an evaluation of every model on held-out prompts (the
stage-1 models' scores are reused from their shipped evaluation when this machine reproduces them).
Then writes <output_dir>/report/: report.md (a table in the layout of the paper's Table 2 with 95%
confidence intervals, and each claim with its paired bootstrap CI), curves.png (per-task reward of the
rollouts over training) and grid_<task>.png (held-out samples, one row per model, the prompt above each
column). Rerunning resumes; finished stages are kept.
"""
import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from flowopd.config import ConfigError, apply_overrides
from flowopd.data import DataError
from pipelines import stage1
from pipelines.launch import setup_logging
from pipelines.recipe import OPD_STAGES, Recipe, load_recipe, shorten
from pipelines.report import (
    Results,
    comparison_claims,
    markdown_table,
    reach_claims,
    rows_json,
    sample_grid,
    table_rows,
    task_columns,
    teacher_claims,
    training_curves,
)

log = logging.getLogger("demo")
SHIPPED_STAGE1 = "assets/world/stage1"
STAGE1_CONFIG = "configs/world_stage1.yaml"
ROWS = ("base", "grpo_mix", "cascade", "cold_start", "sft", *OPD_STAGES)  # teachers go after base
REACHES = 0.95  # "reaches the teacher": at least this fraction of the teacher's score on its own task


def use_stage1(raw: dict, folder: str) -> dict:
    """The recipe with every path into the shipped stage-1 directory pointing at `folder` instead."""
    text = yaml.safe_dump(raw)
    return yaml.safe_load(text.replace(SHIPPED_STAGE1, folder.rstrip("/")))


def findings(recipe: Recipe, res: Results) -> list[str]:
    """The questions the demo exists to answer, each with its paired 95% CI."""
    route = recipe.stages["opd"].route
    lines = ["Stage 1 (each teacher on its own task):", *teacher_claims(res, route), "",
             "OPD against each teacher on that teacher's task:", *reach_claims(res, "opd", route, REACHES), "",
             "OPD against the baselines, and the MAR ablation (average over tasks):",
             *comparison_claims(res, [("opd", "grpo_mix"), ("opd", "cascade"), ("opd", "opd_without_mar")])]
    if "diffusionopd" in res.models:
        lines += ["", "DiffusionOPD (ODE rollouts, mean matching, no MAR) against each teacher on its task:",
                  *reach_claims(res, "diffusionopd", route, REACHES), "",
                  "DiffusionOPD against the baselines, and Flow-OPD without MAR (SDE, exact KL) against it "
                  + "(average over tasks):",
                  *comparison_claims(res, [("diffusionopd", "grpo_mix"), ("diffusionopd", "cascade"),
                                           ("opd_without_mar", "diffusionopd")])]
    forgetting = [(t, teacher) for t, teacher in route.items() if {"cascade", teacher} <= set(res.models)]
    if forgetting:
        lines += ["", "Cascade RL against each teacher on its task (forgetting shows as a drop):",
                  *[c for t, teacher in forgetting for c in reach_claims(res, "cascade", {t: teacher}, REACHES)]]
    return lines


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


def stage1_manifest(recipe: Recipe) -> Path:
    """Where the stage-1 job published the manifest of the teachers this recipe uses."""
    return Path(recipe.teacher_adapter(next(iter(recipe.teachers)))).parent / "manifest.json"


def stage1_samples(recipe: Recipe) -> dict[str, int]:
    """Training samples behind each teacher and RL baseline: what this recipe's stages spend for the ones it
    trains, the stage-1 manifest for the ones it is given."""
    path = stage1_manifest(recipe)
    out = {n: m["samples"] for n, m in json.loads(path.read_text())["models"].items()} if path.exists() else {}
    trained = {n: [f"teachers/{n}"] for n in recipe.teachers} | {"grpo_mix": ["grpo_mix"],
                                                                  "cascade": recipe.cascade_stages()}
    for name, stages in trained.items():
        if stages and all(s in recipe.stages for s in stages):
            out[name] = sum(recipe.samples(s) for s in stages)
    return out


def stage1_budgets(recipe: Recipe) -> list[str]:
    """Samples behind each stage-1 model, from the manifest next to the teachers it uses."""
    path = stage1_manifest(recipe)
    if not path.exists():
        return []
    models = json.loads(path.read_text())["models"]
    return ["Stage-1 training samples: " + ", ".join(f"{n} {m['samples']:,}" for n, m in models.items())
            + f" (from `{path}`)."]


def write_report(recipe: Recipe, minutes: float) -> Path:
    out = recipe.out
    ev_dir = out / "evaluate"
    ev = recipe.stages["evaluate"]
    summary = json.loads((ev_dir / "summary.json").read_text())
    res = Results(ev_dir, task_columns(ev, summary))
    rows = table_rows(res, ["base", *recipe.teachers, *ROWS[1:]])
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    training = [s for s in recipe.stages if s not in ("evaluate", "cold_start")]
    training_curves(out, training, res.tasks, rep / "curves.png")
    for task in res.tasks:
        sample_grid(ev_dir, list(rows), task, rep / f"grid_{task}.png")
    counts = {t: ev.samples_for(t) for t in res.tasks}
    n_prompts = {t: len(set(res.scores("base", t)[1])) for t in res.tasks}
    intro = (f"Held-out prompts ({', '.join(f'{t}: {n_prompts[t]} prompts x {counts[t]} seeds' for t in res.tasks)}), "
             f"ODE sampling with {ev.sampling.num_steps} steps and guidance {ev.sampling.guidance}; every model sees "
             f"the same prompts and seeds. Each cell is the mean of the task's reward "
             f"({', '.join(res.columns.values())}) ± the half-width of its 95% CI; CIs come from a bootstrap "
             f"that resamples seeds within each prompt (2,000 draws), paired across models for differences. "
             f"A difference is called shown only when its CI excludes 0.")
    text = ["# Flow-OPD demo report", "", intro, "", markdown_table(res.tasks, rows),
            "## What it shows", "", *findings(recipe, res), "", *stage1_budgets(recipe),
            stage_times(recipe, minutes), "",
            "Training curves: `curves.png`; samples: " + ", ".join(f"`grid_{t}.png`" for t in res.tasks) + "; "
            "per-image scores: `../evaluate/results.parquet`."]
    (rep / "report.md").write_text("\n".join(text) + "\n")
    (rep / "table.json").write_text(json.dumps(rows_json(rows), indent=1))
    return rep / "report.md"


def run(argv, doc: str, additions=None, extra_report=None, add_arguments=None) -> int:
    """The demo's command line and run. `add_arguments(parser)` adds flags; `additions(raw, args)` changes the
    recipe before the command line's key=value overrides; `extra_report(recipe, report_path)` writes more of
    the report afterwards."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments:
        add_arguments(ap)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--quick", action="store_true", help="2 steps per training stage, a small evaluation")
    ap.add_argument("--retrain-stage1", action="store_true",
                    help=f"train the stage-1 models again ({STAGE1_CONFIG}, hours on 2 cores) into "
                         f"<output_dir>/stage1 and use them instead of the shipped ones")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe file")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    published = None
    try:
        def edit(raw):
            nonlocal published
            raw = shorten(raw, 2) if args.quick else raw
            raw = additions(raw, args) if additions else raw
            if not args.retrain_stage1:
                return raw
            out = apply_overrides(copy.deepcopy(raw), args.overrides).get("output_dir", "runs/demo")
            published = Path(out) / "stage1" / "models"
            return use_stage1(raw, str(published))
        recipe = load_recipe(args.config, args.overrides, edit)
        base = Path(recipe.defaults.get("model", {}).get("base", ""))
        if not base.exists():
            raise ConfigError(f"defaults.model.base: {base} does not exist (the world model ships in "
                              f"assets/world; `python -m pipelines.train_world` rebuilds it)")
        if not args.retrain_stage1:
            given = {n: spec["adapter"] for n, spec in recipe.teachers.items() if "adapter" in spec}
            for name, adapter in given.items():  # teachers with a `grpo:` body are trained by the recipe
                if not Path(adapter).exists():
                    raise ConfigError(f"teachers.{name}.adapter: {adapter} does not exist (the stage-1 models "
                                      f"ship in {SHIPPED_STAGE1}; --retrain-stage1 trains them)")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    if published is not None and not published.exists():
        code = stage1.main(["--config", STAGE1_CONFIG, "--output", str(published),
                            f"output_dir={published.parent / 'runs'}", *(["--quick"] if args.quick else []),
                            *(["--no-progress"] if args.no_progress else [])])
        if code:
            return code
    recipe.out.mkdir(parents=True, exist_ok=True)
    recipe.run(progress=not args.no_progress)
    report = write_report(recipe, (time.time() - started) / 60)
    if extra_report:
        extra_report(recipe, report)
    print(report.read_text())
    log.info("report: %s", report)
    return 0


def main(argv=None) -> int:
    return run(argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
