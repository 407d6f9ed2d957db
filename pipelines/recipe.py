"""The whole paper as one resumable job: teachers (trained with GRPO or given), the GRPO-Mix and cascade-RL
baselines (trained or given), the cold start, OPD with MAR (and optionally without, for the ablation), and
an evaluation of every model. Without an `opd:` section it is stage 1 alone (teachers and baselines).

    python -m pipelines.recipe --config configs/tiny_recipe.yaml
    ray job submit --working-dir . -- python -m pipelines.recipe --config my_recipe.yaml

Each stage writes into output_dir/<stage>/ and, when finished, a DONE.json there. Running the job again
skips finished stages (their outputs are never rewritten) and resumes an unfinished training stage from
its newest checkpoint. Every stage's configuration is validated before the first stage starts.
"""
import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

from flowopd.config import (
    ColdStartConfig,
    ConfigError,
    EvalConfig,
    GRPOConfig,
    OPDConfig,
    apply_overrides,
    read_yaml,
    validate,
)
from flowopd.data import DataError
from pipelines.cold_start import run_merge
from pipelines.evaluate import evaluate, preflight_eval
from pipelines.grpo import export_adapter
from pipelines.launch import STOPPED, add_time_limit, deadline, init_ray, setup_logging, train
from pipelines.preflight import preflight, read_sources

log = logging.getLogger("recipe")
STAGE_KEYS = ("defaults", "teachers", "grpo_mix", "cascade", "cold_start", "opd", "opd_without_mar", "diffusionopd",
              "sft", "curves", "evaluate")
OPD_STAGES = ("opd_without_mar", "diffusionopd", "opd")  # the students, in the order reports list them
STUDENTS = ("sft", *OPD_STAGES)  # every student stage: SFT on teacher samples, then the OPD variants
CURVE_STAGES = ("grpo_mix", *OPD_STAGES)  # stages whose checkpoints `curves: true` evaluates


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class Recipe:
    def __init__(self, raw: dict):
        unknown = set(raw) - {"output_dir", "tiny_assets", "ray_address", *STAGE_KEYS}
        if unknown:
            raise ConfigError(f"recipe: unknown keys {sorted(unknown)}")
        if "output_dir" not in raw:
            raise ConfigError("recipe: output_dir is required")
        self.raw, self.out = raw, Path(raw["output_dir"])
        self.defaults = raw.get("defaults", {})
        self.teachers = raw.get("teachers") or {}
        if not self.teachers:
            raise ConfigError("teachers: name at least one teacher (`adapter:` given, or `grpo:` to train)")
        self.stages = self._configs()

    def _job(self, stage: str, cls, body: dict,
             keep=("seed", "model", "student", "sampling", "rollout", "learner", "logger")):
        """A stage's validated config: the recipe defaults it uses, overlaid with its own section."""
        keep = keep + (("data",) if cls is not EvalConfig else ())
        merged = deep_merge({k: v for k, v in self.defaults.items() if k in keep}, body)
        merged.setdefault("output_dir", str(self.out / stage))
        if self.raw.get("ray_address"):
            merged["ray_address"] = self.raw["ray_address"]
        return validate(cls, merged, f"recipe stage {stage}")

    def teacher_adapter(self, name: str) -> str:
        spec = self.teachers[name]
        return spec["adapter"] if "adapter" in spec else str(self.out / "teachers" / name / "adapter")

    def baseline_adapter(self, name: str) -> str | None:
        """The adapter of a baseline (grpo_mix, cascade): given, trained here, or None when not configured."""
        spec = self.raw.get(name)
        if not spec:
            return None
        if "adapter" in spec:
            return spec["adapter"]
        if name == "cascade":
            return str(self.out / self.cascade_stages()[-1] / "adapter")
        return str(self.out / name / "adapter")

    def cascade_stages(self) -> list[str]:
        order = (self.raw.get("cascade") or {}).get("order") or []
        return [f"cascade/{i}_{name}" for i, name in enumerate(order, 1)]

    def _cascade(self, stages: dict) -> None:
        """Cascade RL: GRPO on one teacher's task and reward, then the next from there, and so on; each step
        of the chain spends what that teacher's own training spends (or the `cascade` overrides)."""
        spec = copy.deepcopy(self.raw["cascade"])
        if "adapter" in spec:
            return
        order = spec.pop("order", None)
        if not order:
            raise ConfigError("cascade: give `adapter:` (a trained cascade) or `order:` (teacher names to train "
                              "in sequence)")
        previous = None
        for name, stage in zip(order, self.cascade_stages()):
            if "grpo" not in self.teachers.get(name, {}):
                raise ConfigError(f"cascade.order: {name!r} is not a teacher trained here (one with `grpo:`)")
            body = deep_merge(deep_merge(self.teachers[name]["grpo"], spec), {"export_dir": str(self.out / stage / "adapter")})
            if previous is not None:
                body = deep_merge(body, {"student": {"init_adapter": previous}})
            stages[stage] = self._job(stage, GRPOConfig, body)
            previous = body["export_dir"]

    def _configs(self) -> dict:
        stages = {}
        for name, spec in self.teachers.items():
            if "grpo" in spec:
                body = deep_merge(spec["grpo"], {"export_dir": self.teacher_adapter(name)})
                stages[f"teachers/{name}"] = self._job(f"teachers/{name}", GRPOConfig, body)
            elif "adapter" not in spec:
                raise ConfigError(f"teachers.{name}: give `adapter:` (an existing teacher) or `grpo:` (train one)")
        mix = self.raw.get("grpo_mix")
        if mix and "adapter" not in mix:
            stages["grpo_mix"] = self._job("grpo_mix", GRPOConfig, mix)
        if self.raw.get("cascade"):
            self._cascade(stages)
        if self.raw.get("opd"):
            cs = copy.deepcopy(self.raw.get("cold_start") or {"method": "merge"})
            cs.setdefault("teachers", {n: {"adapter": self.teacher_adapter(n)} for n in self._task_teachers()})
            if cs.get("method") == "sft":  # each task's teacher samples its own prompts, as OPD routes them
                cs.setdefault("route", self.raw["opd"].get("route", {}))
            stages["cold_start"] = self._job("cold_start", ColdStartConfig, cs)
            opd = copy.deepcopy(self.raw["opd"])
            opd.setdefault("teachers", {})
            for n in self.teachers:
                opd["teachers"].setdefault(n, {"adapter": self.teacher_adapter(n)})
            opd = deep_merge(opd, {"student": self._student_start(stages["cold_start"])})
            stages["opd"] = self._job("opd", OPDConfig, opd)
            if self.raw.get("opd_without_mar"):
                stages["opd_without_mar"] = self._job("opd_without_mar", OPDConfig,
                                                      deep_merge(opd, {"mar": {"teacher": None}}))
            if self.raw.get("diffusionopd"):  # true, or a mapping of changes to the OPD stage
                dopd = deep_merge(opd, {"mar": {"teacher": None}, "sampling": {"noise_level": 0.0}})
                extra = self.raw["diffusionopd"]
                stages["diffusionopd"] = self._job("diffusionopd", OPDConfig,
                                                   deep_merge(dopd, extra) if isinstance(extra, dict) else dopd)
            if self.raw.get("sft"):  # true, or a mapping of changes to the SFT stage
                sft = {"method": "sft", "route": dict(stages["opd"].route),
                       "teachers": {n: {"adapter": self.teacher_adapter(n)} for n in self._task_teachers()}}
                extra = self.raw["sft"]
                stages["sft"] = self._job("sft", ColdStartConfig, deep_merge(sft, extra) if isinstance(extra, dict) else sft)
        elif any(self.raw.get(k) for k in ("cold_start", "opd_without_mar", "diffusionopd", "sft")):
            raise ConfigError("cold_start / opd_without_mar / diffusionopd / sft: these need an `opd:` section")
        stages["evaluate"] = self._job("evaluate", EvalConfig,
                                       deep_merge(self.raw.get("evaluate") or {}, {"models": self._eval_models(stages)}),
                                       keep=("seed", "model", "rollout", "logger"))
        return stages

    def _task_teachers(self) -> list[str]:
        route = (self.raw.get("opd") or {}).get("route", {})
        return sorted(set(route.values()) & set(self.teachers)) or sorted(self.teachers)

    def _student_start(self, cs: ColdStartConfig) -> dict:
        if cs.method == "merge" and cs.merge.method == "fuse":
            return {"base": cs.output_path()}
        return {"init_adapter": cs.output_path()}

    def _eval_models(self, stages) -> dict:
        models = {"base": {}, **{n: {"adapter": self.teacher_adapter(n)} for n in self.teachers}}
        for name in ("grpo_mix", "cascade"):
            if self.baseline_adapter(name):
                models[name] = {"adapter": self.baseline_adapter(name)}
        if "cold_start" in stages:
            cs = stages["cold_start"]
            kind = "transformer" if "base" in self._student_start(cs) else "adapter"
            models["cold_start"] = {kind: cs.output_path()}
        for name in STUDENTS:
            if name in stages:
                models[name] = {"adapter": str(self.out / name / "adapter")}
        for name, step in self.curve_points(stages):
            models[f"{name}@{step}"] = {"adapter": str(self.checkpoint_adapter(name, step, stages))}
        return models

    def curve_points(self, stages=None) -> list[tuple[str, int]]:
        """With `curves: true`, the (stage, step) of every checkpoint before the last one of GRPO-Mix (when
        trained here) and of each OPD stage, evaluated too so that a report can draw reward against samples."""
        stages = self.stages if stages is None else stages
        if not self.raw.get("curves"):
            return []
        points = []
        for name in CURVE_STAGES:
            if name in stages:
                train = stages[name].train
                steps = list(range(train.checkpoint_every, train.steps, train.checkpoint_every))
                if len(steps) + 1 > train.keep_checkpoints:
                    raise ConfigError(f"{name}.train.keep_checkpoints: curves need all {len(steps) + 1} checkpoints "
                                      f"of the stage kept (got {train.keep_checkpoints})")
                points += [(name, k) for k in steps]
        return points

    def checkpoint_adapter(self, stage: str, step: int, stages=None) -> Path:
        """The adapter a stage would export had it stopped at `step`: its EMA when it keeps one, else the student."""
        from flowopd.checkpoint import STUDENT_DIR, step_dir_name
        cfg = (self.stages if stages is None else stages)[stage]
        ema = isinstance(cfg, GRPOConfig) and cfg.grpo.ema_decay
        return self.out / stage / "checkpoints" / step_dir_name(step) / ("ema" if ema else STUDENT_DIR)

    def samples(self, stage: str) -> int:
        """Training samples a stage spends (0 for stages that do not sample rollouts)."""
        cfg = self.stages[stage]
        if isinstance(cfg, (GRPOConfig, OPDConfig)):
            return cfg.train.steps * cfg.data.prompts_per_step * cfg.data.group_size
        if isinstance(cfg, ColdStartConfig) and cfg.method == "sft":  # the teachers' images it learns from
            return cfg.sft.samples_per_prompt * sum(len(recs) for recs in read_sources(cfg.data.sources))
        return 0

    def done(self, stage: str) -> bool:
        return (self.out / stage / "DONE.json").exists()

    def finish(self, stage: str, summary: dict) -> None:
        from flowopd.checkpoint import write_json_atomic
        write_json_atomic(self.out / stage / "DONE.json", summary)

    def check_data(self) -> None:
        """Read every stage's prompt files now, so a bad file fails the job before the first stage runs."""
        for stage, cfg in self.stages.items():
            if hasattr(cfg, "data") and not self.done(stage):
                try:
                    read_sources(cfg.data.sources)
                except ConfigError as e:
                    raise ConfigError(f"recipe stage {stage}: {e}") from None

    def run(self, progress: bool = True, deadline: float | None = None) -> dict | None:
        """Run every unfinished stage; returns the evaluation's summary, or None when `deadline` (time.time())
        passed first: the training stage running then is checkpointed, no later stage starts, and running the
        recipe again continues from there."""
        init_ray(self.raw.get("ray_address"))
        total = sum(self.samples(st) for st in self.stages if not self.done(st)) or 1
        spent, started_all = 0, time.time()
        for stage, cfg in self.stages.items():
            if self.done(stage) and isinstance(cfg, EvalConfig) and self._models_changed(stage, cfg):
                log.info("%s: the recipe's models changed since it ran; evaluating again", stage)
            elif self.done(stage):
                log.info("%s: finished earlier, skipped", stage)
                continue
            if deadline is not None and time.time() >= deadline:
                log.info("time limit: stopping before %s; run the same command again to continue", stage)
                return None
            log.info("%s: running", stage)
            started = time.time()
            summary = self.run_stage(stage, cfg, progress, deadline)
            if summary.get("stopped"):
                log.info("time limit: %s stopped at step %d of %d (checkpointed); run the same command again to "
                         "continue", stage, summary["steps"], cfg.train.steps)
                return None
            minutes = (time.time() - started) / 60
            self.finish(stage, {**summary, "minutes": round(minutes, 2), "samples": self.samples(stage)})
            spent += self.samples(stage)
            elapsed = (time.time() - started_all) / 60
            eta = f"; about {elapsed * (total - spent) / spent:.0f} min of training left" if spent and spent < total else ""
            log.info("%s: done in %.1f min (%d%% of this run's training samples%s)", stage, minutes,
                     100 * spent // total, eta)
        return json.loads((self.out / "evaluate" / "summary.json").read_text())

    def _models_changed(self, stage: str, cfg: EvalConfig) -> bool:
        recorded = json.loads((self.out / stage / "DONE.json").read_text()).get("models")
        return recorded is not None and recorded != _model_specs(cfg)

    def run_stage(self, stage: str, cfg, progress: bool, deadline: float | None = None) -> dict:
        from actors.grpo_trainer import GRPOTrainer
        from actors.opd_trainer import OPDTrainer
        from actors.resources import check_cluster_resources
        if isinstance(cfg, EvalConfig):
            check_cluster_resources(cfg)
            return {"summary": evaluate(cfg, preflight_eval(cfg)), "models": _model_specs(cfg)}
        if isinstance(cfg, ColdStartConfig):
            out = Path(cfg.output_path())
            if out.exists():  # written atomically: it is complete, only DONE.json was not
                return {"output": str(out)}
            if cfg.method == "merge":
                return run_merge(cfg)
        from actors.sft_trainer import SFTTrainer
        sources = preflight(cfg)
        check_cluster_resources(cfg)
        trainer = {GRPOConfig: GRPOTrainer, OPDConfig: OPDTrainer, ColdStartConfig: SFTTrainer}[type(cfg)]
        dest = (cfg.export_dir if isinstance(cfg, GRPOConfig)
                else cfg.output_path() if isinstance(cfg, ColdStartConfig) else None)
        return train(cfg, sources, trainer, resume=True, progress=progress,
                     finish=lambda tr: export_adapter(tr, dest), deadline=deadline)


def _model_specs(cfg: EvalConfig) -> dict:
    """What an evaluation stage evaluated: a later run with other models evaluates again."""
    return {name: m.model_dump(mode="json", exclude={"sampling"} if m.sampling is None else None)
            for name, m in cfg.models.items()}


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
    ev["samples_per_prompt"] = 2
    ev.setdefault("sampling", {})["num_steps"] = 6
    return raw


def load_recipe(config: str, overrides: list[str], edit=None) -> Recipe:
    """The recipe file with `edit` (a function of the raw dict) and key=value overrides applied, validated,
    tiny assets created when named, and every stage's prompt files read."""
    raw = read_yaml(Path(config))
    raw = apply_overrides(edit(raw) if edit else raw, overrides)
    recipe = Recipe(raw)
    if raw.get("tiny_assets"):
        from world.tiny import ensure_tiny_assets
        ensure_tiny_assets(raw["tiny_assets"])
    recipe.check_data()
    return recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--no-progress", action="store_true")
    add_time_limit(ap)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe file")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        recipe = load_recipe(args.config, args.overrides)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(recipe.out, exist_ok=True)
    summary = recipe.run(progress=not args.no_progress, deadline=deadline(args.time_limit))
    if summary is None:
        return STOPPED
    print(json.dumps({"output_dir": str(recipe.out), "models": sorted(summary)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
