"""Few-step generators (RTDMD) in one resumable job: AC-DMD distils a few-step generator from the teacher, RTDMD
(optional) tilts it toward a reward, then an evaluation of both beside the base at its usual and at few steps,
and a report with paired CIs.

    python -m pipelines.few_step [--config configs/world_few_step.yaml] [--quick] [key=value ...]

The config names the training jobs (`ac_dmd:`, a DMD job file; its output_dir becomes <output_dir>/ac_dmd; and
optionally `rtdmd:`, an RTDMD job file, output <output_dir>/rtdmd, started from the AC-DMD generator and fake
score) and the evaluation (`evaluate:`, an evaluation job without output_dir; `models` are evaluated in the order given,
the first is the reference every other is compared with; `{output_dir}` in an adapter path is this job's
output directory). Training resumes from its newest checkpoint; a
finished stage (DONE.json) is not run again, and an evaluation whose models changed reuses the rows of the
models it already scored. Writes <output_dir>/report.md and report.json.
"""
import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from flowopd.config import (
    ConfigError,
    DMDConfig,
    EvalConfig,
    RTDMDConfig,
    apply_overrides,
    load_raw,
    read_yaml,
    validate,
)
from flowopd.data import DataError
from pipelines.launch import init_ray, setup_logging, train
from pipelines.preflight import preflight

log = logging.getLogger("few_step")
REACH = 0.9  # a few-step model should keep this share of the reference's score on every task


def configs(raw: dict, quick: bool) -> tuple[list[DMDConfig], EvalConfig]:
    """The training jobs (AC-DMD, then RTDMD if configured) and the evaluation, validated before anything runs
    (--quick: 2 training steps, the EMA folded every step, 2 prompts per task, one sample each)."""
    out = Path(raw.get("output_dir") or "runs/few_step")
    if not raw.get("ac_dmd") or not raw.get("evaluate"):
        raise ConfigError("few_step: the config needs `ac_dmd:` (a DMD job file) and `evaluate:`")
    short = ["train.steps=2", "train.checkpoint_every=1", "data.prompts_per_step=4"] if quick else []
    job = load_raw(raw["ac_dmd"], [f"output_dir={out / 'ac_dmd'}", *short])
    job.pop("tiny_assets", None)
    jobs = [validate(DMDConfig, job, raw["ac_dmd"])]
    if raw.get("rtdmd"):
        tilt = load_raw(raw["rtdmd"], [f"output_dir={out / 'rtdmd'}", f"student.init_adapter={out / 'ac_dmd' / 'adapter'}",
                                       f"fake.init_adapter={out / 'ac_dmd' / 'fake_score'}", *short,
                                       *(["data.group_size=4", "rtdmd.ema_every=1"] if quick else [])])
        tilt.pop("tiny_assets", None)
        jobs.append(validate(RTDMDConfig, tilt, raw["rtdmd"]))
    body = {**raw["evaluate"], "output_dir": str(out / "evaluate")}
    body["models"] = {name: {**m, **({"adapter": m["adapter"].format(output_dir=out)} if m.get("adapter") else {})}
                      for name, m in (body.get("models") or {}).items()}
    if quick:
        body.update(samples_per_prompt=1, data={**body["data"], "max_prompts_per_source": 2})
    return jobs, validate(EvalConfig, body, "evaluate")


def run_training(cfg: DMDConfig, progress: bool) -> None:
    from actors.dmd_trainer import DMDTrainer
    from actors.resources import check_cluster_resources
    from actors.rtdmd_trainer import RTDMDTrainer
    from flowopd.checkpoint import CheckpointManager
    from pipelines.dmd import export
    name = Path(cfg.output_dir).name
    done = Path(cfg.output_dir) / "DONE.json"
    if done.exists():
        log.info("%s: done (%s)", name, done)
        return
    sources = preflight(cfg)
    check_cluster_resources(cfg)
    resume = CheckpointManager(f"{cfg.output_dir}/checkpoints").latest() is not None
    t = time.time()
    summary = train(cfg, sources, RTDMDTrainer if isinstance(cfg, RTDMDConfig) else DMDTrainer, resume, progress, export)
    done.write_text(json.dumps({**summary, "minutes": (time.time() - t) / 60}, indent=1))


def run_evaluation(cfg: EvalConfig) -> None:
    """Evaluate unless done with these models; when the models changed, the earlier evaluation moves aside and
    its rows are reused for the models that are unchanged."""
    from pipelines.evaluate import evaluate, preflight_eval
    out = Path(cfg.output_dir)
    done = out / "DONE.json"
    if done.exists():
        if json.loads(done.read_text()).get("models") == list(cfg.models):
            return
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        cfg = cfg.model_copy(update={"reuse": str(previous)})
    evaluate(cfg, preflight_eval(cfg))
    done.write_text(json.dumps({"models": list(cfg.models)}))


def write_report(cfg: EvalConfig, path: Path, minutes: float) -> Path:
    from flowopd.stats import verdict
    from pipelines.report import Results, markdown_table, reach_claims, rows_json, sample_grid, table_rows, task_columns
    eval_dir = Path(cfg.output_dir)
    summary = json.loads((eval_dir / "summary.json").read_text())
    res = Results(eval_dir, task_columns(cfg, summary))
    names = list(cfg.models)
    reference, rows = names[0], table_rows(res, names)
    train_minutes = sum(json.loads(x)["time"]["total"] for stage in ("ac_dmd", "rtdmd")
                  if (metrics := Path(cfg.output_dir).parent / stage / "metrics.jsonl").exists()
                  for x in metrics.read_text().splitlines()) / 60
    lines = [f"# Few-step generators (training {train_minutes:.0f} min, this run {minutes:.0f} min)\n",
             "Held-out prompts × seeds per task: " + ", ".join(
                 f"{t} {len(res.scores(reference, t)[0])}" for t in res.tasks) + "; each model with its own sampler "
             "(see index.json); mean ± 95% CI half-width.\n", markdown_table(res.tasks, rows),
             "\nClaims, with paired 95% CIs (shown only when the CI excludes 0):\n"]
    for name in names[1:]:
        lines += reach_claims(res, name, {t: reference for t in res.tasks}, REACH, of=reference)
    few = [n for n in names[1:] if n.startswith("base")]
    trained = [n for n in names[1:] if n not in few]
    for i, name in enumerate(trained):  # against the base at few steps, and against every earlier generator
        lines += [f"* {verdict(res.diff(name, b, t), (t or 'average') + f': {name} − {b}')}"
                  for b in few + trained[:i] for t in [*res.tasks, None]]
    (path.parent / "grids").mkdir(exist_ok=True)
    for t in res.tasks:
        sample_grid(eval_dir, names, t, path.parent / "grids" / f"{t}.png")
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"rows": rows_json(rows)}, indent=1))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/world_few_step.yaml")
    ap.add_argument("--quick", action="store_true", help="2 training steps and a small evaluation (a smoke test)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of this file, e.g. output_dir=runs/x")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        raw = apply_overrides(read_yaml(Path(args.config)), args.overrides)
        jobs, eval_cfg = configs(raw, args.quick)
        preflight(jobs[0])  # a later stage starts from this one's exports: checked when they exist
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    init_ray(jobs[0].ray_address)
    for job in jobs:
        run_training(job, not args.no_progress)
    run_evaluation(eval_cfg)
    report = write_report(eval_cfg, Path(raw.get("output_dir") or "runs/few_step") / "report.md",
                          (time.time() - started) / 60)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
