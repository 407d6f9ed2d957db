"""Stage 1 in the world: single-task Flow-GRPO teachers and the two RL baselines, trained from the shipped
base model and published for the demo.

    python -m pipelines.stage1                          # configs/world_stage1.yaml -> assets/world/stage1
    python -m pipelines.stage1 --output /tmp/stage1 --force
    python -m pipelines.stage1 teachers.text_teacher.grpo.train.steps=50     # any recipe key=value

Runs the stage-1 recipe in its output_dir (runs/stage1; run the same command again to resume): a teacher
per task, GRPO-Mix on the same total number of samples as the teachers together, cascade RL (GRPO on one
task, then the next from there, same total), and an evaluation of them and the base on held-out prompts.
Then publishes into --output: one peft adapter directory per model, evaluation/ (per-image scores that the
demo reuses instead of sampling these models again), curves.png and manifest.json (budgets, settings,
seeds, held-out rewards with 95% CIs, minutes). An existing --output is never replaced without --force.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from flowopd.config import ConfigError, GRPOConfig
from flowopd.data import DataError
from pipelines.launch import STOPPED, add_time_limit, deadline, setup_logging
from pipelines.preflight import read_sources
from pipelines.recipe import Recipe, load_recipe, shorten
from pipelines.report import (
    Results,
    comparison_claims,
    markdown_table,
    probe_curve,
    probe_plot,
    rows_json,
    table_rows,
    task_columns,
    teacher_claims,
    training_curves,
)

log = logging.getLogger("stage1")


def published_models(recipe: Recipe) -> dict[str, dict]:
    """{model: {adapter, stages}} for every teacher and baseline the recipe trains or names."""
    models = {name: {"adapter": recipe.teacher_adapter(name), "stages": [f"teachers/{name}"]}
              for name in recipe.teachers}
    if recipe.baseline_adapter("grpo_mix"):
        models["grpo_mix"] = {"adapter": recipe.baseline_adapter("grpo_mix"), "stages": ["grpo_mix"]}
    if recipe.baseline_adapter("cascade"):
        models["cascade"] = {"adapter": recipe.baseline_adapter("cascade"), "stages": recipe.cascade_stages()}
    return models


def stage_settings(cfg: GRPOConfig) -> dict:
    """What decides a stage-1 model besides its data: the knobs a reader needs to reproduce it."""
    d = cfg.model_dump(mode="json")
    return {k: d[k] for k in ("seed", "student", "sampling", "grpo", "train")} | {
        "data": {k: d["data"][k] for k in ("sources", "prompts_per_step", "group_size", "mixing")},
        "rewards": [{k: r[k] for k in ("name", "label", "weight", "tasks")} for r in d["rewards"]],
        "learner": {k: d["learner"][k] for k in ("lr", "weight_decay", "betas", "grad_clip", "ranks")}}


def manifest(recipe: Recipe, models: dict, rows: dict) -> dict:
    done = {s: json.loads((recipe.out / s / "DONE.json").read_text()) for s in recipe.stages}
    entries = {}
    for name, m in models.items():
        stages = [s for s in m["stages"] if s in recipe.stages]
        entries[name] = {"adapter": name, "stages": stages,
                         "samples": sum(recipe.samples(s) for s in stages),
                         "minutes": round(sum(done[s].get("minutes", 0) for s in stages), 1),
                         "settings": {s: stage_settings(recipe.stages[s]) for s in stages}}
    ev = recipe.stages["evaluate"]
    return {"base": str(ev.model.base), "seed": ev.seed, "models": entries,
            "evaluation": {"samples_per_prompt": ev.samples_per_prompt, "sampling": ev.sampling.model_dump(mode="json"),
                           "sources": [s.path for s in ev.data.sources], "rows": rows_json(rows)},
            "minutes": {s: d.get("minutes") for s, d in done.items()}}


def route(recipe: Recipe) -> dict[str, str]:
    """{task: teacher} for the teachers trained here on prompts of a single task."""
    out = {}
    for name in recipe.teachers:
        cfg = recipe.stages.get(f"teachers/{name}")
        if cfg is not None:
            tasks = {r.task for recs in read_sources(cfg.data.sources) for r in recs}
            if len(tasks) == 1:
                out.setdefault(tasks.pop(), name)
    return out


def publish(recipe: Recipe, dest: Path, force: bool) -> Path:
    """Copy adapters, the evaluation, curves and manifest into dest (written beside it, then renamed)."""
    from flowopd.models import adapter_weights_file
    models = published_models(recipe)
    ev_dir = recipe.out / "evaluate"
    summary = json.loads((ev_dir / "summary.json").read_text())
    res = Results(ev_dir, task_columns(recipe.stages["evaluate"], summary))
    rows = table_rows(res, ["base", *models])
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, m in models.items():
        (tmp / name).mkdir()
        shutil.copy2(Path(m["adapter"]) / "adapter_config.json", tmp / name)
        shutil.copy2(adapter_weights_file(m["adapter"]), tmp / name)
    shutil.copytree(ev_dir, tmp / "evaluation", ignore=shutil.ignore_patterns("DONE.json"))
    training = [s for s in recipe.stages if s != "evaluate"]
    training_curves(recipe.out, training, res.tasks, tmp / "curves.png")
    doc = manifest(recipe, models, rows)
    probes = {s: probe_curve(recipe.out / s / "probe.jsonl") for s in training
              if (recipe.out / s / "probe.jsonl").exists()}
    if probes:  # held-out reward against samples, every `probe.every` steps of each stage
        probe_plot({s.removeprefix("teachers/"): pts for s, pts in probes.items()}, tmp / "probe.png")
        doc["probe_curves"] = probes
    claims = teacher_claims(res, route(recipe)) + comparison_claims(
        res, [("grpo_mix", "base"), ("cascade", "base"), ("cascade", "grpo_mix")])
    doc["claims"] = [c.removeprefix("* ") for c in claims]
    (tmp / "manifest.json").write_text(json.dumps(doc, indent=1))
    (tmp / "README.md").write_text(
        "# Stage-1 models of the world\n\nMade by `python -m pipelines.stage1`; settings, budgets and "
        "held-out rewards in `manifest.json`.\n\n" + markdown_table(res.tasks, rows) + "\n" + "\n".join(claims) + "\n")
    if dest.exists():
        if not force:
            raise ConfigError(f"--output: {dest} exists; pass --force to replace it")
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/world_stage1.yaml")
    ap.add_argument("--output", default="assets/world/stage1", help="where the published models go")
    ap.add_argument("--force", action="store_true", help="replace an existing --output")
    ap.add_argument("--quick", action="store_true", help="2 steps per training stage, a small evaluation")
    ap.add_argument("--no-progress", action="store_true")
    add_time_limit(ap)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe file")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        recipe = load_recipe(args.config, args.overrides, (lambda raw: shorten(raw, 2)) if args.quick else None)
        if "opd" in recipe.stages:
            raise ConfigError(f"{args.config}: a stage-1 recipe has no `opd:` section")
        dest = Path(args.output)
        if dest.exists() and not args.force:
            raise ConfigError(f"--output: {dest} exists; pass --force to replace it (nothing was changed)")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    recipe.out.mkdir(parents=True, exist_ok=True)
    if recipe.run(progress=not args.no_progress, deadline=deadline(args.time_limit)) is None:
        return STOPPED
    path = publish(recipe, dest, args.force)
    log.info("published to %s in %.1f min", path, (time.time() - started) / 60)
    print((path / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
