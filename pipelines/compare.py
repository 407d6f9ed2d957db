"""Sample efficiency in the world: held-out reward against the training samples spent, for Flow-OPD (SDE
rollouts, exact KL, with and without MAR), DiffusionOPD (ODE rollouts, mean matching), SFT on the teachers'
samples, GRPO-Mix and cascade RL.

    python -m pipelines.compare                   # configs/demo.yaml plus the stages below, ~30 min on 2 cores
    python -m pipelines.compare --quick           # every stage for a couple of steps (CI, smoke test)
    python -m pipelines.compare --retrain-grpo-mix  # GRPO-Mix trained again here, with points along its curve
    python -m pipelines.compare sft.train.steps=600

The demo's recipe (shipped stage-1 models, cold start, OPD with and without MAR) with three additions:
DiffusionOPD at the OPD stage's budget, SFT on the routed teachers' own samples as a student of its own, and
an evaluation of every OPD checkpoint. The samples a model spent: a stage-1 model's GRPO rollouts (from the
stage-1 manifest); a student's: the stage-1 samples of every teacher it learns from, plus its own (OPD
rollouts, or the teacher images SFT learns). Writes the demo's report into <output_dir>/report/ (default
runs/compare) with a "Sample efficiency" section, efficiency.png (reward against samples, per task and on
average, 95% CIs) and efficiency.json. Rerunning resumes; finished stages are kept.
"""
import copy
import json
import logging
import sys
from pathlib import Path

import matplotlib
import numpy as np

from flowopd.config import read_yaml
from flowopd.stats import verdict
from pipelines import demo
from pipelines.recipe import OPD_STAGES, Recipe, deep_merge, shorten
from pipelines.report import Results, task_columns

log = logging.getLogger("compare")
SFT_STAGE = {"sft": {"samples_per_prompt": 4, "batch_size": 64, "sampling": {"num_steps": 10, "guidance": 3.0}},
             "train": {"steps": 300, "checkpoint_every": 100}}
LABELS = {"grpo_mix": "GRPO-Mix", "cascade": "cascade RL", "sft": "SFT on teacher samples",
          "opd": "Flow-OPD (SDE, MAR)", "opd_without_mar": "Flow-OPD without MAR", "diffusionopd": "DiffusionOPD (ODE)"}


def add_arguments(ap) -> None:
    ap.add_argument("--retrain-grpo-mix", action="store_true",
                    help=f"train GRPO-Mix again with the settings of {demo.STAGE1_CONFIG} (about 25 minutes on 2 "
                         f"cores) so that its curve has points at a third and two thirds of its budget")


def additions(raw: dict, args) -> dict:
    raw = copy.deepcopy(raw)
    raw["output_dir"] = "runs/compare"
    raw.setdefault("diffusionopd", True)
    raw.setdefault("sft", copy.deepcopy(SFT_STAGE))
    raw["curves"] = True
    if args.retrain_grpo_mix:
        raw["grpo_mix"] = stage1_grpo_mix(args.quick)
    if args.quick:  # one intermediate checkpoint per OPD stage, one teacher image per prompt
        raw["opd"]["train"]["checkpoint_every"] = 1
        raw["sft"]["train"] = {"steps": 2, "checkpoint_every": 2}
        raw["sft"]["sft"].update(samples_per_prompt=1, sampling={"num_steps": 6, "guidance": 3.0})
    return raw


def stage1_grpo_mix(quick: bool) -> dict:
    """The GRPO-Mix stage of the stage-1 recipe, its defaults folded in, checkpointed at thirds of its steps
    (checkpoints change nothing else: the run is the shipped one)."""
    stage1 = read_yaml(Path(demo.STAGE1_CONFIG))
    stage1 = shorten(stage1, 3) if quick else stage1
    body = deep_merge(stage1["defaults"], stage1["grpo_mix"])
    steps = body["train"]["steps"]
    body["train"].update(checkpoint_every=steps // 3, keep_checkpoints=3)
    return body


def efficiency_points(recipe: Recipe) -> dict[str, list[tuple[str, int]]]:
    """{method: [(evaluated model, training samples behind it)]}, in the order the samples were spent."""
    spent = demo.stage1_samples(recipe)

    def teachers(names) -> int | None:
        return sum(spent[n] for n in names) if all(n in spent for n in names) else None

    curve = recipe.curve_points()
    methods = {LABELS[b]: [("base", 0), (b, spent[b])] for b in ("grpo_mix", "cascade") if b in spent}
    if "grpo_mix" in recipe.stages:  # trained here: its checkpoints too
        cfg = recipe.stages["grpo_mix"]
        per_step = cfg.data.prompts_per_step * cfg.data.group_size
        methods[LABELS["grpo_mix"]][1:1] = [(f"grpo_mix@{k}", k * per_step) for s, k in curve if s == "grpo_mix"]
    cold = set(recipe.stages["cold_start"].teachers) if "cold_start" in recipe.stages else set()
    for stage in OPD_STAGES:
        if stage not in recipe.stages:
            continue
        cfg = recipe.stages[stage]
        start = teachers(cold | set(cfg.used_teachers()))
        if start is None:
            log.warning("%s: the stage-1 samples of its teachers are unknown (no manifest); left out", stage)
            continue
        per_step = cfg.data.prompts_per_step * cfg.data.group_size
        steps = [k for s, k in curve if s == stage] + [cfg.train.steps]
        methods[LABELS[stage]] = [("cold_start", teachers(cold))] * bool(cold) + [
            (f"{stage}@{k}" if k < cfg.train.steps else stage, start + k * per_step) for k in steps]
    if "sft" in recipe.stages and (start := teachers(recipe.stages["sft"].used_teachers())) is not None:
        methods[LABELS["sft"]] = [("sft", start + recipe.samples("sft"))]
    return methods


def efficiency_report(recipe: Recipe, report: Path) -> None:
    """The sample-efficiency section of the report, efficiency.png and efficiency.json."""
    ev_dir = recipe.out / "evaluate"
    res = Results(ev_dir, task_columns(recipe.stages["evaluate"], json.loads((ev_dir / "summary.json").read_text())))
    methods = {m: [(name, n) for name, n in pts if name in res.models] for m, pts in efficiency_points(recipe).items()}
    spent = demo.stage1_samples(recipe)
    route = recipe.stages["opd"].route
    table, data = ["| method | model | samples | " + " | ".join([*res.tasks, "average"]) + " |",
                   "|---" * (len(res.tasks) + 4) + "|"], {}
    for method, pts in methods.items():
        for name, n in pts:
            est = {t: res.mean(name, t) for t in res.tasks} | {"average": res.mean(name)}
            data.setdefault(method, []).append({"model": name, "samples": n, **{
                c: {"mean": e.mean, "lo": e.lo, "hi": e.hi, "n": e.n} for c, e in est.items()}})
            table.append(f"| {method} | {name} | {n:,} | " + " | ".join(
                f"{e.mean:.3f} ± {e.half_width:.3f}" for e in est.values()) + " |")
    teacher_pts = {t: (route[t], spent[route[t]]) for t in res.tasks
                   if t in route and route[t] in spent and route[t] in res.models}
    plot(res, data, teacher_pts, report.parent / "efficiency.png")
    (report.parent / "efficiency.json").write_text(json.dumps(
        {"methods": data, "teachers": {t: {"model": m, "samples": n} for t, (m, n) in teacher_pts.items()}}, indent=1))
    claims = []
    for student in ("cold_start", "sft", *OPD_STAGES):
        for baseline in ("grpo_mix", "cascade"):
            if {student, baseline} <= set(res.models) and student in {m for p in methods.values() for m, _ in p}:
                n_s = next(n for p in methods.values() for m, n in p if m == student)
                d = res.diff(student, baseline)
                claims.append(f"* {verdict(d, f'average: {student} − {baseline}')} "
                              f"({n_s:,} against {spent[baseline]:,} samples)")
    text = ["", "## Sample efficiency", "",
            ("Held-out reward against the training samples behind each model: a stage-1 model's GRPO rollouts; a "
            "student's, the stage-1 samples of every teacher it learns from plus its own (OPD rollouts, or the "
            "teacher images SFT learns). Same prompts, seeds and CIs as the table above; `efficiency.png` draws it."),
            "", *table, "", "Each student against the RL baselines (average over tasks, paired 95% CI):", *claims]
    with report.open("a") as f:
        f.write("\n".join(text) + "\n")


def plot(res: Results, data: dict, teacher_pts: dict, path: Path) -> None:
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    columns = [*res.tasks, "average"]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for method, pts in data.items():
            x = np.array([p["samples"] for p in pts]) / 1000
            y = np.array([p[col]["mean"] for p in pts])
            err = np.array([[p[col]["mean"] - p[col]["lo"], p[col]["hi"] - p[col]["mean"]] for p in pts]).T
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=method)
        if col in teacher_pts:
            name, n = teacher_pts[col]
            e = res.mean(name, col)
            ax.errorbar([n / 1000], [e.mean], yerr=[[e.mean - e.lo], [e.hi - e.mean]], marker="*", ms=10,
                        color="black", ls="none", label=name)
        ax.set_title(col)
        ax.set_xlabel("training samples (thousands)")
        ax.set_ylabel("held-out reward")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return demo.run(argv, __doc__, additions=additions, extra_report=efficiency_report, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
