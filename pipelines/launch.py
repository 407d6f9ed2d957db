"""What the training jobs share: Ray start-up, the command line, pre-flight checks, resume and run.

Ray, torch and the actors are imported where they are first needed, so `--help` and a bad command line
answer at once.
"""
import argparse
import importlib
import json
import logging
import os
import sys
import time

from flowopd.config import ConfigError, OPDConfig, load_raw, validate
from flowopd.data import DataError
from pipelines.preflight import preflight


def setup_logging() -> None:
    """One format for every pipeline's status lines: `[component] message` on stderr."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr, force=True)


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`), else start a private local instance."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        # "local" always starts a private instance: never attach to (or wait for) a cluster recorded by an
        # earlier `ray start` that may be dead
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=env,
                 logging_level=logging.WARNING)


def load_job(path: str, overrides=(), cls=OPDConfig):
    """The job file with key=value overrides, validated as `cls`. A top-level `tiny_assets:` names a
    directory of random test models and prompts for CPU runs: it is built here (once) and is not part of
    the job's configuration; `tiny_assets=null` among the overrides skips it."""
    raw = load_raw(path, overrides)
    tiny_assets = raw.pop("tiny_assets", None)
    cfg = validate(cls, raw, str(path))
    if tiny_assets:
        from world.tiny import ensure_tiny_assets
        ensure_tiny_assets(tiny_assets)
    return cfg


def describe(cfg, sources) -> str:
    """A short plan of the job: data, who labels or scores what, and what each actor group asks for."""
    from actors.resources import requested_resources
    lines = [(f"data: {sum(len(s) for s in sources)} prompts from {len(sources)} sources ({cfg.data.mixing}); "
              f"{cfg.data.prompts_per_step} prompts x {cfg.data.group_size} samples per step")]
    lines += cfg.plan()
    lines += [f"{k}: " + ", ".join(f"{v:g} {r}" for r, v in asked.items() if v)
              for k, asked in requested_resources(cfg).items()]
    return "\n".join(lines)


def parse_args(doc: str, argv=None):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML job configuration")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")
    ap.add_argument("--check", action="store_true",
                    help="validate the config, its files and Hub ids, print the plan and stop (no Ray, no GPU)")
    add_time_limit(ap)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    return ap.parse_intermixed_args(argv)


STOPPED = 3  # the exit status of a job that reached --time-limit: run the same command (with --resume) again


def add_time_limit(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                    help=f"after this many minutes, checkpoint the current training step and exit with status "
                         f"{STOPPED}; the same command resumes (long runs over several sittings)")


def deadline(minutes: float | None) -> float | None:
    return None if minutes is None else time.time() + 60 * minutes


def run_job(argv, doc: str, config_cls, trainer, finish=None) -> int:
    """Validate everything, then train (resuming on request); `finish(trainer)` runs after the last step.
    `trainer` is a Trainer class, or "module:Class" to import it only once the command line is parsed."""
    args = parse_args(doc, argv)
    from actors.resources import check_cluster_resources
    from flowopd.checkpoint import CheckpointManager
    try:
        cfg = load_job(args.config, args.overrides, config_cls)
        sources = preflight(cfg)
        if args.check:
            print(describe(cfg, sources), file=sys.stderr)
            return 0
        existing = CheckpointManager(f"{cfg.output_dir}/checkpoints").latest()
        if existing is not None and not args.resume:
            raise ConfigError(f"output_dir: {existing} already exists; pass --resume to continue that run or "
                              f"choose another output_dir (nothing was changed)")
        init_ray(cfg.ray_address)
        check_cluster_resources(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(cfg, sources), file=sys.stderr)
    if isinstance(trainer, str):
        module, name = trainer.split(":")
        trainer = getattr(importlib.import_module(module), name)
    summary = train(cfg, sources, trainer, args.resume, not args.no_progress, finish, deadline(args.time_limit))
    print(json.dumps(summary))
    if summary["stopped"]:
        print(f"time limit: stopped after step {summary['steps']} of {cfg.train.steps}; run the same command with "
              f"--resume to continue", file=sys.stderr)
        return STOPPED
    return 0


def train(cfg, sources, trainer_cls, resume: bool, progress: bool = True, finish=None,
          deadline: float | None = None) -> dict:
    """Run one training job to its last step (from its newest checkpoint when resuming), release its
    actors, and return a summary (plus whatever `finish(trainer)` adds). Past `deadline` (time.time()) the job
    checkpoints and stops: the summary says `stopped` and `finish` is not called."""
    trainer = trainer_cls(cfg, sources)
    try:
        if resume:
            step = trainer.resume()
            print(f"resumed at step {step}" if step else "no checkpoint found; starting at step 0", file=sys.stderr)
        history = trainer.run(progress=progress, deadline=deadline)
        summary = {"final_checkpoint": str(trainer.ckpt.latest()), "steps": trainer.step_done,
                   "last_loss": history[-1]["loss"] if history else None, "stopped": trainer.stopped}
        if finish is not None and not trainer.stopped:
            summary.update(finish(trainer))
        return summary
    finally:
        trainer.shutdown()
